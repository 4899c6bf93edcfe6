"""Single-turn on-policy distillation on a JSONL prompt dataset.

    python -m recipes.distillation.on_policy [dataset=PATH.jsonl] [key=value ...]   (--help)

The student answers each prompt (``group_size`` samples per row); a frozen teacher scores every
sampled token, under the row's privileged ``teacher_messages`` when it has them; the student
learns to close the per-token gap (``loss=sampled_reverse_kl``), or matches the teacher's
distribution (``jsd`` with ``beta``, ``topk_forward_kl`` with ``top_k``). ``lmbda`` < 1 mixes in
off-policy steps as in GKD (``training.off_policy``): the dataset's reference responses
(``off_policy_source=dataset``) or the teacher's own generations (``teacher``). Every
``eval_every`` steps the student answers ``validation_dataset`` greedily: ``eval/teacher_kl``
(the teacher's per-token KL on those answers) and ``eval/success_rate`` (exact-match accuracy
over the rows that carry ``expected_answer``; ``envs.prompts.normalize_answer``).

With no arguments it runs offline: the embedded SmolLM2-135M-Instruct as student and teacher, on
the bundled arithmetic example (recipes/data/arithmetic.jsonl, validated on
arithmetic_val.jsonl). ``dataset_builder=my_pkg.my_envs:make_datasets`` trains on your own envs
instead (any ``envs.types.DatasetBuilder``: message or token envs, one turn or many), with this
recipe's command line, checks, logs, checkpoints and ``resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from envs.prompts import PromptDataset, PromptDatasetBuilder, PromptDatasetConfig
from envs.types import DatasetBuilder
from recipes.cli import ConfigError, Importable
from recipes.common import (
    MixKeys,
    Student,
    StudentKeys,
    TeacherKeys,
    check_resume,
    cli,
    default_log_path,
    lmbda_mix,
    load_student,
    load_teacher,
    make_sampler,
    run_config,
    run_training,
    single_teacher,
    user_datasets,
)
from training.off_policy import reference_script
from training.rollouts import Policy, ScriptedPolicy
from training.trainer import Trainer, TrainerConfig, TrainResult

RECIPE = "on_policy"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
"""The small example datasets shipped with the recipes."""


class PromptKeys(StudentKeys):
    """The prompt dataset and how batches are drawn from it."""

    dataset: Path = DATA_DIR / "arithmetic.jsonl"
    """Training rows, JSONL: {messages, teacher?, teacher_messages?, expected_answer?}."""
    validation_dataset: Path | None = DATA_DIR / "arithmetic_val.jsonl"
    """Rows evaluated every eval_every steps (null: no evaluation)."""
    group_size: int = Field(4, ge=1)
    """Samples per row in a batch."""
    groups_per_batch: int = Field(8, ge=1)
    """Rows per batch."""
    eval_group_size: int = Field(1, ge=1)
    """Samples per validation row."""
    epochs: int = Field(1, ge=1)
    """Passes over the training rows (each a fresh seeded shuffle)."""


class Config(TrainerConfig, MixKeys, PromptKeys, TeacherKeys):
    """Single-turn on-policy distillation on a JSONL prompt dataset (or your own envs)."""

    dataset_builder: Annotated[DatasetBuilder | None, Importable()] = None
    """module:attr of your own envs' DatasetBuilder (envs.types): called once, it returns
    (train Dataset, eval Dataset or None). It replaces dataset, validation_dataset,
    group_size, groups_per_batch, eval_group_size and epochs; the module must be importable
    (on PYTHONPATH or in the current folder)."""

    max_tokens: int = Field(64, ge=1)
    """Sampling budget of the answer."""
    max_trajectory_tokens: int | None = Field(1024, ge=2)
    """Budget of prompt plus answer."""


# ---- the parts -------------------------------------------------------------------------------


def prompt_datasets(config: PromptKeys) -> tuple[PromptDataset, PromptDataset | None]:
    """The train and validation datasets (rows validated; errors name file and line)."""
    builder = PromptDatasetBuilder(
        PromptDatasetConfig(
            dataset=config.dataset,
            validation_dataset=config.validation_dataset,
            group_size=config.group_size,
            groups_per_batch=config.groups_per_batch,
            eval_group_size=config.eval_group_size,
            epochs=config.epochs,
            seed=getattr(config, "seed", 0),
        )
    )
    return builder()


def dataset_policy(datasets: list[PromptDataset], student: Student) -> Policy:
    """Replays the rows' reference responses; every row must have one."""
    responses: dict[tuple[str, int], Any] = {}
    missing: list[str] = []
    for dataset in datasets:
        for index, row in enumerate(dataset.rows):
            if row.response:
                responses[(dataset.source, index)] = row.response
            else:
                missing.append(f"row {index + 1} of {dataset.source}")
    if missing:
        raise ConfigError(
            f"off_policy_source=dataset needs a reference response (trailing assistant "
            f"messages) in every row; {len(missing)} rows have none, the first: {missing[0]}; "
            "add them or use off_policy_source=teacher"
        )
    return ScriptedPolicy(reference_script(responses), student.renderer)


def references(prompts: list[PromptDataset], student: Student) -> Policy:
    """The replay of the prompt rows' references (``off_policy_source=dataset``)."""
    if not prompts:
        raise ConfigError(
            "off_policy_source=dataset replays the reference responses of prompt rows, which "
            "dataset_builder envs do not have; use off_policy_source=teacher"
        )
    return dataset_policy(prompts, student)


def build_trainer(config: Config) -> Trainer:
    """Everything the run needs, checked up front: rows, models, vocabulary, the mix."""
    check_resume(config)
    prompts: list[PromptDataset] = []
    if config.dataset_builder is not None:
        dataset, validation = user_datasets(config.dataset_builder, "dataset_builder")
    else:
        dataset, validation = prompt_datasets(config)
        prompts = [dataset]
    student = load_student(config, config.seed)
    teacher = load_teacher(single_teacher(config), student, config=config)
    log_path = default_log_path(RECIPE, config)
    return Trainer(
        config,
        model=student.model,
        tokenizer=student.tokenizer,
        renderer=student.renderer,
        sampler=make_sampler(config, student, config.seed),
        teacher=teacher.teacher,
        teacher_renderer=teacher.renderer,
        full_vocabulary_teacher=teacher.full_vocabulary,
        dataset=dataset,
        eval_dataset=validation,
        off_policy=lmbda_mix(
            config, lambda: references(prompts, student), teacher, teacher.full_vocabulary
        ),
        log_path=log_path,
        run_config=run_config(config, log_path),
    )


async def main(config: Config) -> TrainResult:
    trainer = build_trainer(config)
    return await run_training(trainer)


if __name__ == "__main__":
    raise SystemExit(cli(main, Config))
