"""On-policy distillation from several teachers, routed or blended.

    python -m recipes.distillation.multi_teacher [key=value ...]                    (--help)
    python -m recipes.distillation.multi_teacher \\
        teachers='[{"model": "A", "route": "math"}, {"model": "B", "route": "geo"}]' \\
        dataset=rows.jsonl mode=routed

Each teacher is a model, optionally with a ``checkpoint`` loaded onto it (a LoRA adapter, or a
checkpoint or run folder of ours), a ``route`` value and a blend ``weight``; ``url`` makes it a
vLLM server teacher.

- ``mode=routed``: each episode is scored by the teacher its ``route_key`` (default
  ``teacher``) names, a teacher's route value or model name; loss ``sampled_reverse_kl``
  (default). Single-turn rows carry the key (``"teacher": "math"``); ``datasets`` gives a
  teacher per dataset instead (JSONL prompts or Harbor tasks alike), each with its own share of
  the batch.
- ``mode=blended``: every teacher scores every episode; their top-K distributions are mixed by
  weight; loss ``topk_forward_kl`` (default) with ``top_k``.

Logs ``teacher_kl/<route>`` and ``teacher_share/<route>`` per teacher. With no arguments it runs
offline: the embedded SmolLM2 as student and as two routed teachers (``math``, ``geo``) on the
bundled mixed example (recipes/data/mixed.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from envs.harbor.builders import HarborDistillationDatasetBuilder, HarborEnvConfig
from envs.mixture import DatasetPart, MixedDataset
from envs.prompts import PromptDataset, PromptDatasetBuilder, PromptDatasetConfig
from recipes.cli import ConfigError, RecipeConfig
from recipes.common import (
    LoadedTeacher,
    MixKeys,
    OffPolicySource,
    Student,
    TeacherSpec,
    check_resume,
    cli,
    default_log_path,
    lmbda_mix,
    load_student,
    load_teacher,
    make_sampler,
    run_config,
    run_training,
)
from recipes.distillation.harbor_multi_turn import check_backend
from recipes.distillation.on_policy import DATA_DIR, PromptKeys, dataset_policy
from training.objectives import LossName
from training.teachers.multi import BlendedTeacher, RoutedTeacher, TeacherMember
from training.trainer import Trainer, TrainerConfig, TrainResult

RECIPE = "multi_teacher"


class Mode(StrEnum):
    """How several teachers share the scoring."""

    ROUTED = "routed"
    """Each episode is scored by the one teacher its route key names."""
    BLENDED = "blended"
    """Every teacher scores every episode; distributions are mixed by weight."""


class DatasetSpec(RecipeConfig):
    """One dataset of a mixture, with the teacher that scores its episodes."""

    prompts: Path | None = None
    """A JSONL prompt dataset (give this or tasks)."""
    tasks: list[str] | None = None
    """Harbor task sources (task dirs, dataset folders, registry.json, bundled[:train])."""
    teacher: str | None = None
    """The route of the teacher for every episode of this dataset (None: the rows' own)."""
    groups_per_batch: int = Field(4, ge=1)
    """This dataset's groups in each batch."""

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.prompts is None) == (self.tasks is None):
            raise ValueError("give exactly one of prompts (a JSONL file) or tasks (Harbor tasks)")
        return self


def _default_teachers() -> list[TeacherSpec]:
    return [TeacherSpec(route="math"), TeacherSpec(route="geo")]


class Config(TrainerConfig, MixKeys, PromptKeys):
    """On-policy distillation from several teachers, routed or blended."""

    teachers: list[TeacherSpec] = Field(default_factory=_default_teachers, min_length=1)
    """The teachers, as JSON: [{"model", "checkpoint"?, "route"?, "weight"?, "url"?,
    "protocol"?, "served_name"?}, ...]."""
    mode: Mode = Mode.ROUTED
    """routed (each episode to the teacher its route names) | blended (weighted mixture)."""
    route_key: str = "teacher"
    """The metadata key (a prompt row's field) that names an episode's teacher."""
    default_teacher: str | None = None
    """Route of the teacher for episodes that name none (None: such episodes are an error)."""
    dataset: Path = DATA_DIR / "mixed.jsonl"
    """Training rows, JSONL, each naming its teacher by route_key (ignored when datasets is
    set)."""
    validation_dataset: Path | None = None
    """Rows evaluated every eval_every steps (null: no evaluation)."""
    datasets: list[DatasetSpec] = Field(default_factory=list)
    """A teacher per dataset instead, as JSON: [{"prompts": PATH | "tasks": [...], "teacher":
    ROUTE, "groups_per_batch": N}, ...]; batches concatenate every dataset's groups."""
    loss: LossName = LossName.SAMPLED_REVERSE_KL
    """Default: sampled_reverse_kl when routed, topk_forward_kl when blended."""
    max_tokens: int = Field(64, ge=1)
    """Sampling budget of one assistant turn."""
    max_trajectory_tokens: int | None = Field(2048, ge=2)
    """Budget of one training sequence."""
    # ---- Harbor datasets (in datasets) ----
    backend: str = "local"
    """Sandbox backend of Harbor datasets: local, docker, harbor:<type>, module:attr."""
    max_turns: int = Field(10, ge=1)
    """Assistant turns per Harbor episode."""
    command_timeout_s: float = Field(30.0, gt=0)
    """Timeout of one bash command in Harbor episodes."""

    @model_validator(mode="before")
    @classmethod
    def _loss_by_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and "loss" not in data and data.get("mode") == Mode.BLENDED:
            return {**data, "loss": LossName.TOPK_FORWARD_KL}
        return data


# ---- the parts -------------------------------------------------------------------------------


def load_teachers(config: Config, student: Student) -> list[tuple[TeacherSpec, LoadedTeacher]]:
    """Each distinct teacher model is loaded once; teachers that differ only in route or weight
    share it."""
    loaded: dict[tuple, LoadedTeacher] = {}
    out = []
    for spec in config.teachers:
        key = (spec.model, spec.checkpoint, spec.url, spec.protocol, spec.served_name)
        if key not in loaded:
            loaded[key] = load_teacher(spec, student, config=config)
        out.append((spec, loaded[key]))
    return out


def multi_teacher(config: Config, teachers: list[tuple[TeacherSpec, LoadedTeacher]]):
    """The routed or blended teacher over the loaded members."""
    members = [
        TeacherMember(t.teacher, t.renderer, route=spec.route or spec.model, weight=spec.weight)
        for spec, t in teachers
    ]
    try:
        if config.mode is Mode.BLENDED:
            return BlendedTeacher(members)
        return RoutedTeacher(members, route_key=config.route_key, default=config.default_teacher)
    except ValueError as error:
        raise ConfigError(f"teachers: {error}") from None


@dataclass
class TrainingData:
    """What the run trains and evaluates on."""

    dataset: Any
    validation: PromptDataset | None
    prompt_sets: list[PromptDataset]
    """The prompt datasets in ``dataset`` (their rows feed off-policy steps)."""
    routes: list[str | None]
    """Every route value an episode will carry (None: an episode that names none)."""


def training_data(config: Config) -> TrainingData:
    """The datasets ``config`` names; rows validated, tasks loaded."""

    def prompts(path: Path, groups: int, validation: Path | None = None):
        return PromptDatasetBuilder(
            PromptDatasetConfig(
                dataset=path,
                validation_dataset=validation,
                group_size=config.group_size,
                groups_per_batch=groups,
                eval_group_size=config.eval_group_size,
                epochs=config.epochs,
                seed=config.seed,
            )
        )()

    if not config.datasets:
        train, validation = prompts(
            config.dataset, config.groups_per_batch, config.validation_dataset
        )
        sets = [train, *([validation] if validation else [])]
        return TrainingData(train, validation, [train], _row_routes(sets))
    parts, prompt_sets, routes = [], [], []
    validation = (
        prompts(config.validation_dataset, config.groups_per_batch)[0]
        if config.validation_dataset
        else None
    )
    if validation is not None:
        routes += _row_routes([validation])
    for spec in config.datasets:
        if spec.prompts is not None:
            dataset, _ = prompts(spec.prompts, spec.groups_per_batch)
            prompt_sets.append(dataset)
            name = spec.prompts.stem
            routes += [spec.teacher] if spec.teacher is not None else _row_routes([dataset])
        else:
            harbor = HarborEnvConfig(
                tasks=spec.tasks or [],
                backend=config.backend,
                group_size=config.group_size,
                groups_per_batch=spec.groups_per_batch,
                epochs=config.epochs,
                seed=config.seed,
                max_turns=config.max_turns,
                command_timeout_s=config.command_timeout_s,
            )
            dataset, _ = HarborDistillationDatasetBuilder(harbor, check_backend(config.backend))()
            name = "harbor"
            routes.append(spec.teacher)
        parts.append(DatasetPart(dataset, route=spec.teacher, name=name))
    mixed = MixedDataset(parts, route_key=config.route_key)
    return TrainingData(mixed, validation, prompt_sets, routes)


def _row_routes(datasets: list[PromptDataset]) -> list[str | None]:
    return [row.teacher for dataset in datasets for row in dataset.rows]


def check_routes(teacher: Any, routes: list[str | None]) -> None:
    """Every route the data names must reach a teacher, before anything runs."""
    if not isinstance(teacher, RoutedTeacher):
        return
    try:
        teacher.check_routes(routes)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_trainer(config: Config) -> Trainer:
    check_resume(config)
    if config.lmbda < 1.0 and config.off_policy_source is OffPolicySource.TEACHER:
        raise ConfigError(
            "off_policy_source=teacher is not supported with several teachers; use "
            "off_policy_source=dataset (the rows' reference responses)"
        )
    data = training_data(config)
    student = load_student(config, config.seed)
    loaded = load_teachers(config, student)
    teacher = multi_teacher(config, loaded)
    check_routes(teacher, data.routes)
    full = all(t.full_vocabulary for _, t in loaded)
    if config.lmbda < 1.0 and len(data.prompt_sets) != (len(config.datasets) or 1):
        raise ConfigError("lmbda < 1 needs reference responses: use only prompt datasets")
    log_path = default_log_path(RECIPE, config)
    return Trainer(
        config,
        model=student.model,
        tokenizer=student.tokenizer,
        renderer=student.renderer,
        sampler=make_sampler(config, student, config.seed),
        teacher=teacher,
        full_vocabulary_teacher=full,
        dataset=data.dataset,
        eval_dataset=data.validation,
        off_policy=lmbda_mix(config, lambda: dataset_policy(data.prompt_sets, student), None, full),
        log_path=log_path,
        run_config=run_config(config, log_path),
    )


async def main(config: Config) -> TrainResult:
    trainer = build_trainer(config)
    return await run_training(trainer)


if __name__ == "__main__":
    raise SystemExit(cli(main, Config))
