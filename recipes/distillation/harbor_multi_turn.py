"""Multi-turn on-policy distillation on Harbor tasks.

    python -m recipes.distillation.harbor_multi_turn [key=value ...]     (--help lists every key)

The student works on Harbor tasks in sandboxes (a bash tool, several turns); a frozen teacher,
prompted with the task's reference solution (the privileged view), scores every token the
student produced; the student learns to close the per-token gap. No reward is used for
training; held-out tasks are graded by their own verifiers for evaluation. With no arguments it
runs offline: the embedded SmolLM2-135M-Instruct as student and teacher, the bundled task suite,
local (bubblewrap) sandboxes.

``main(config)`` builds the parts (models, sampler, teacher, datasets) and calls the trainer;
each part is also usable on its own from Python.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from envs.errors import EnvsError
from envs.harbor.builders import HarborDistillationDatasetBuilder, HarborEnvConfig
from envs.harbor.tasks import HarborTask
from envs.harbor.teacher_view import solution_commands
from recipes.cli import ConfigError, RecipeConfig, dump_config, run_cli
from sandboxes.factory import make_factory
from sandboxes.types import SandboxFactory
from tool_use.renderers import get_renderer
from tool_use.renderers.base import Renderer, RendererError
from tool_use.types import Message, TokenEnv, ToolCall
from training import models
from training.errors import ModelLoadError, TrainingError, VocabularyMismatchError
from training.rollouts import ScriptedPolicy
from training.samplers import HFSampler
from training.teachers import LocalTeacher, VLLMServerTeacher
from training.trainer import Trainer, TrainerConfig, TrainResult
from training.types import Teacher
from training.vocab import check_same_vocabulary

log = logging.getLogger(__name__)

RECIPE = "harbor_multi_turn"


class Config(TrainerConfig, RecipeConfig):
    """Multi-turn on-policy distillation on Harbor tasks."""

    recipe_name: ClassVar[str] = RECIPE
    """Names the default log folder: runs/<recipe_name>-<timestamp>."""

    # ---- models ----
    model_name: str = models.EMBEDDED_MODEL
    """The student: a Hugging Face id, a local folder, or smollm2-135m-instruct (embedded)."""
    teacher_model: str = models.EMBEDDED_MODEL
    """The teacher (same vocabulary as the student). With teacher_url, its tokenizer is loaded
    from here and the server is asked for teacher_served_name."""
    teacher_url: str | None = None
    """Base URL of a vLLM OpenAI-compatible server that scores for the teacher (e.g.
    http://127.0.0.1:8000); None: the teacher runs in this process."""
    teacher_served_name: str | None = None
    """The model name the teacher server serves (default: teacher_model)."""
    renderer: str | None = None
    """Chat-template renderer of the student and teacher (chatml, qwen2.5, qwen3, llama3,
    template); None: detected from each tokenizer."""
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """auto (bf16 where the hardware computes it natively, else fp32) | bf16 | fp32 | fp16."""
    lora_rank: int = Field(16, ge=0)
    """LoRA rank; 0: full fine-tuning."""
    lora_alpha: float | None = None
    """LoRA alpha (default 2 * lora_rank)."""

    # ---- tasks and episodes ----
    tasks: list[str] = Field(default_factory=lambda: ["bundled"])
    """Task sources: task dirs, dataset folders, registry.json, bundled[:train|:test]. Plain
    bundled trains on the suite's train split and evaluates on its test split."""
    eval_tasks: list[str] = Field(default_factory=list)
    """Held-out tasks for evaluation (default: the split of tasks, if any)."""
    backend: str = "local"
    """Sandbox backend: local (bubblewrap), docker, harbor:<type>, or module:attr (a factory)."""
    max_turns: int = Field(10, ge=1)
    """Assistant turns per episode."""
    group_size: int = Field(4, ge=1)
    """Episodes per task in a batch."""
    groups_per_batch: int = Field(8, ge=1)
    """Tasks per batch."""
    eval_group_size: int = Field(1, ge=1)
    """Episodes per held-out task in an evaluation."""
    epochs: int = Field(1, ge=1)
    """Passes over the training tasks (each a fresh shuffle)."""
    command_timeout_s: float = Field(30.0, gt=0)
    """Timeout of one bash command."""
    privileged_teacher: bool = True
    """The teacher sees the task's reference solution (solution/solve.sh) in its prompt."""
    teacher_template: str | None = None
    """The teacher's first user message, with fields {instruction}, {solution} (solve.sh),
    {commands} (solve.sh without shebang, set -e and comments) and {task_name}; None: the
    default template of envs/harbor/teacher_view.py."""


# ---- the parts ---------------------------------------------------------------------------------


def env_config(config: Config) -> HarborEnvConfig:
    """The Harbor environment knobs of ``config``."""
    updates: dict[str, Any] = {
        "tasks": config.tasks,
        "eval_tasks": config.eval_tasks,
        "backend": config.backend,
        "group_size": config.group_size,
        "groups_per_batch": config.groups_per_batch,
        "eval_group_size": config.eval_group_size,
        "epochs": config.epochs,
        "seed": config.seed,
        "max_turns": config.max_turns,
        "command_timeout_s": config.command_timeout_s,
    }
    if not config.privileged_teacher:
        updates["teacher_template"] = None
    elif config.teacher_template is not None:
        updates["teacher_template"] = config.teacher_template
    return HarborEnvConfig(**updates)


def check_backend(backend: str) -> SandboxFactory:
    """The sandbox factory for ``backend``, or a ``ConfigError`` saying why it cannot work here."""
    if backend == "local":
        from sandboxes.local import bwrap_available

        problem = bwrap_available()
        if problem is not None:
            raise ConfigError(f"backend=local: {problem} (or use backend=docker)")
    if backend == "docker":
        try:
            import docker

            docker.from_env().ping()
        except Exception as error:  # the SDK raises several kinds when the daemon is away
            raise ConfigError(
                f"backend=docker: no docker daemon answers ({error}); start it, or use "
                "backend=local"
            ) from None
    try:
        return make_factory(backend)
    except (ValueError, ImportError) as error:
        raise ConfigError(f"backend={backend}: {error}") from None


def load_teacher(
    config: Config, student_tokenizer: models.Tokenizer
) -> tuple[Teacher, Renderer, bool]:
    """``(teacher, its renderer, whether it returns full logits)``, after checking that it can
    score the student's token ids."""
    tokenizer = models.load_tokenizer(config.teacher_model)
    if config.teacher_url:
        served = config.teacher_served_name or config.teacher_model
        teacher: Teacher = VLLMServerTeacher(config.teacher_url, served)
        vocab_size, full = None, False
    else:
        model, _ = models.load_frozen(config.teacher_model, dtype=config.dtype)
        teacher = LocalTeacher(model, tokenizer, name=config.teacher_model)
        vocab_size, full = model.config.vocab_size, True
    check_same_vocabulary(
        student_tokenizer,
        tokenizer,
        student_name=config.model_name,
        teacher_name=config.teacher_model,
        teacher_vocab_size=vocab_size,
    )
    return teacher, get_renderer(config.renderer, tokenizer), full


def reference_script(tasks: Sequence[HarborTask]):
    """Demonstrations for the SFT warmup: each task's ``solution/solve.sh`` as one bash call,
    then a short closing message. Tasks without a reference solution get only the latter."""
    by_name = {task.name: task for task in tasks}

    def script(env: TokenEnv) -> list[Message]:
        task = by_name.get(getattr(env, "metadata", {}).get("task", ""))
        done = Message(role="assistant", content="Done.")
        if task is None or task.reference_solution is None:
            return [done]
        command = solution_commands(task.reference_solution)
        call = ToolCall(id="call_0", name="bash", arguments=json.dumps({"command": command}))
        return [Message(role="assistant", content="", tool_calls=[call]), done]

    return script


def default_log_path(config: Config) -> Path:
    if config.log_path:
        return Path(config.log_path)
    if isinstance(config.resume, Path):
        resume = config.resume
        return resume.parent.parent if (resume / "state.json").is_file() else resume
    return Path("runs") / f"{config.recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_trainer(config: Config) -> Trainer:
    """Everything the run needs, checked up front: sandbox backend, tasks, models, vocabulary.
    A problem with what the user asked for raises ``ConfigError`` naming it."""
    if config.resume is True and not config.log_path:
        raise ConfigError("resume=true continues the run in log_path: set log_path=RUN_FOLDER")
    factory = check_backend(config.backend)
    try:
        builder = HarborDistillationDatasetBuilder(env_config(config), factory)
        train_tasks, _ = builder.load_split()
        dataset, eval_dataset = builder()
    except (EnvsError, ValueError) as error:
        raise ConfigError(f"tasks={','.join(config.tasks)}: {error}") from None
    torch.manual_seed(config.seed)
    try:
        tokenizer = models.load_tokenizer(config.model_name)
        lora = (
            models.LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha)
            if config.lora_rank > 0
            else None
        )
        model = models.load_model(config.model_name, dtype=config.dtype, lora=lora)
        renderer = get_renderer(config.renderer, tokenizer)
        if config.teacher_from_warmup:  # the warm-started student will be the teacher
            teacher, teacher_renderer, full = None, None, True
        else:
            teacher, teacher_renderer, full = load_teacher(config, tokenizer)
    except (ModelLoadError, VocabularyMismatchError, RendererError) as error:
        raise ConfigError(str(error)) from None
    demonstrations = (
        ScriptedPolicy(reference_script(train_tasks), renderer) if config.sft_warmup_steps else None
    )
    log_path = default_log_path(config)
    try:
        return Trainer(
            config,
            model=model,
            tokenizer=tokenizer,
            renderer=renderer,
            sampler=HFSampler(model, tokenizer, seed=config.seed),
            teacher=teacher,
            teacher_renderer=teacher_renderer,
            full_vocabulary_teacher=full,
            dataset=dataset,
            eval_dataset=eval_dataset,
            demonstrations=demonstrations,
            log_path=log_path,
            run_config={**dump_config(config), "log_path": str(log_path)},
        )
    except (ValueError, TrainingError) as error:
        raise ConfigError(str(error)) from None


async def main(config: Config) -> TrainResult:
    """Build the parts, train, print the closing summary."""
    trainer = build_trainer(config)
    try:
        result = await trainer.train()
    finally:
        if trainer.teacher is not None:
            await trainer.teacher.close()
    print(summary(result))
    return result


def summary(result: TrainResult) -> str:
    """The closing lines: teacher KL first -> last step, eval success before -> after (and in
    between), where the checkpoint, export and logs are."""
    h = result.history

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        "",
        f"Done: {result.steps} steps.",
        f"  teacher KL   step {h.get('teacher_kl_first_step', '-')}: "
        f"{num(h.get('teacher_kl_first'))}  ->  step {h.get('teacher_kl_last_step', '-')}: "
        f"{num(h.get('teacher_kl_last'))}",
        "  eval success on held-out tasks:",
    ]
    for e in h.get("evals", []):
        calls = f"   ({e['tool_calls']:.2f} tool calls/episode)" if "tool_calls" in e else ""
        lines.append(f"    after {e['step']:>3} steps: {num(e['success_rate'])}{calls}")
    lines += [
        f"  logs:        {result.log_path} (metrics.jsonl, rollouts/, config.json)",
        f"  checkpoint:  {result.checkpoint}",
    ]
    lines += [f"  export:      {path} ({kind})" for kind, path in result.exported.items()]
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Terminal output for people: no per-file loading bars from transformers, no deprecation
    noise from peft's use of transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    quiet_libraries()
    run_cli(main, Config)
