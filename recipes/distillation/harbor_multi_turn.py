"""Multi-turn on-policy distillation on Harbor tasks.

    python -m recipes.distillation.harbor_multi_turn [key=value ...]     (--help lists every key)

The student works on Harbor tasks in sandboxes (a bash tool, several turns); a frozen teacher,
prompted with the task's reference solution (the privileged view), scores every token the
student produced; the student learns to close the per-token gap. No reward is used for
training; held-out tasks are graded by their own verifiers for evaluation. ``lmbda`` < 1 mixes
in off-policy steps as in GKD (``training.off_policy``): the tasks' reference solutions replayed
as bash calls (``off_policy_source=dataset``, the demonstrations of ``sft_warmup_steps``), or
turns the teacher writes from its privileged view (``teacher``). With no arguments it runs
offline: the embedded SmolLM2-135M-Instruct as student and teacher, the bundled task suite,
local (bubblewrap) sandboxes.

``main(config)`` builds the parts (models, sampler, teacher, datasets) and calls the trainer;
each part is also usable on its own from Python.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import field_validator

from envs.errors import EnvsError
from envs.harbor.builders import HarborDistillationDatasetBuilder, HarborEnvConfig
from envs.harbor.tasks import HarborTask
from envs.harbor.teacher_view import TeacherView, solution_commands
from recipes.cli import ConfigError
from recipes.common import (
    NO_EVAL_TASKS,
    HarborTaskKeys,
    MixKeys,
    OffPolicySource,
    StudentKeys,
    TeacherKeys,
    check_env_timeout,
    check_resume,
    cli,
    default_log_path,
    eval_split,
    lmbda_mix,
    load_student,
    load_teacher,
    make_sampler,
    run_config,
    run_training,
    single_teacher,
)
from sandboxes.factory import make_factory
from sandboxes.types import SandboxFactory
from tool_use.renderers.base import Renderer, RendererError
from tool_use.types import Message, TokenEnv, ToolCall
from training.errors import ModelLoadError, TrainingError, VocabularyMismatchError
from training.rollouts import Policy, ScriptedPolicy
from training.trainer import Trainer, TrainerConfig, TrainResult

RECIPE = "harbor_multi_turn"


class Config(TrainerConfig, MixKeys, HarborTaskKeys, TeacherKeys, StudentKeys):
    """Multi-turn on-policy distillation on Harbor tasks."""

    recipe_name: ClassVar[str] = RECIPE
    """Names the default log folder: runs/<recipe_name>-<timestamp>."""

    privileged_teacher: bool = True
    """The teacher sees the task's reference solution (solution/solve.sh) in its prompt."""
    teacher_template: str | None = None
    """The teacher's first user message, with fields {instruction}, {solution} (solve.sh),
    {commands} (solve.sh without shebang, set -e and comments) and {task_name}; None: the
    default template of envs/harbor/teacher_view.py."""

    @field_validator("teacher_template")
    @classmethod
    def _known_fields(cls, value: str | None) -> str | None:
        if value is not None:
            TeacherView(value)  # a ValueError naming an unknown field
        return value


# ---- the parts ---------------------------------------------------------------------------------


def env_config(config: Config) -> HarborEnvConfig:
    """The Harbor environment knobs of ``config``."""
    updates: dict[str, Any] = {}
    if not config.privileged_teacher:
        updates["teacher_template"] = None
    elif config.teacher_template is not None:
        updates["teacher_template"] = config.teacher_template
    return config.harbor_env_config(config.seed, **updates)


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


def reference_policy(tasks: Sequence[HarborTask], renderer: Renderer) -> Policy:
    """Replays every task's reference solution (the off-policy turns of
    ``off_policy_source=dataset``); every task must have one."""
    missing = [task.name for task in tasks if task.reference_solution is None]
    if missing:
        raise ConfigError(
            f"off_policy_source=dataset replays each task's reference solution "
            f"(solution/solve.sh); {len(missing)} of {len(tasks)} training tasks have none "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); add them or use "
            "off_policy_source=teacher"
        )
    return ScriptedPolicy(reference_script(tasks), renderer)


def build_trainer(config: Config) -> Trainer:
    """Everything the run needs, checked up front: sandbox backend, tasks, models, vocabulary,
    the lmbda mix. A problem with what the user asked for raises ``ConfigError`` naming it."""
    check_resume(config)
    mixes_teacher_turns = config.lmbda < 1.0 and (
        config.off_policy_source is OffPolicySource.TEACHER
    )
    if mixes_teacher_turns and config.teacher_from_warmup:
        raise ConfigError(
            "off_policy_source=teacher with teacher_from_warmup=true: the teacher only exists "
            "after the warm start, so it cannot be set up to write turns; use "
            "off_policy_source=dataset (the tasks' reference solutions)"
        )
    factory = check_backend(config.backend)
    try:
        builder = HarborDistillationDatasetBuilder(env_config(config), factory)
        train_tasks, eval_tasks = builder.load_split()
        dataset, eval_dataset = builder()
    except (EnvsError, ValueError) as error:
        raise ConfigError(f"tasks={','.join(config.tasks)}: {error}") from None
    check_env_timeout(config.env_timeout_s, [*train_tasks, *eval_tasks], config.command_timeout_s)
    print(eval_split(train_tasks, eval_tasks))
    try:
        student = load_student(config, config.seed)
        teacher = (  # with teacher_from_warmup, the warm-started student becomes the teacher
            None
            if config.teacher_from_warmup
            else load_teacher(single_teacher(config), student, config=config)
        )
    except (ModelLoadError, VocabularyMismatchError, RendererError) as error:
        raise ConfigError(str(error)) from None
    demonstrations = (
        ScriptedPolicy(reference_script(train_tasks), student.renderer)
        if config.sft_warmup_steps
        else None
    )
    full_vocabulary = teacher.full_vocabulary if teacher is not None else True
    off_policy = lmbda_mix(
        config, lambda: reference_policy(train_tasks, student.renderer), teacher, full_vocabulary
    )
    log_path = default_log_path(config.recipe_name, config)
    try:
        return Trainer(
            config,
            model=student.model,
            tokenizer=student.tokenizer,
            renderer=student.renderer,
            sampler=make_sampler(config, student, config.seed),
            teacher=teacher.teacher if teacher is not None else None,
            teacher_renderer=teacher.renderer if teacher is not None else None,
            full_vocabulary_teacher=full_vocabulary,
            dataset=dataset,
            eval_dataset=eval_dataset,
            demonstrations=demonstrations,
            off_policy=off_policy,
            log_path=log_path,
            run_config=run_config(config, log_path),
        )
    except (ValueError, TrainingError) as error:
        raise ConfigError(str(error)) from None


async def main(config: Config) -> TrainResult:
    """Build the parts, train, print the closing summary."""
    return await run_training(build_trainer(config), no_eval=NO_EVAL_TASKS)


if __name__ == "__main__":
    raise SystemExit(cli(main, Config))
