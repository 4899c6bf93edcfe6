"""Harbor tasks as trainer-facing environments.

    HarborEnvConfig                   every knob (tasks, backend, group sizes, turns, prompts)
    HarborDatasetBuilder(config)()    -> (train HarborDataset, eval HarborDataset | None),
                                         episodes rewarded by the task's own verifier (RL, eval)
    HarborDistillationDatasetBuilder  the same tasks with zero reward and, by default, the
                                         privileged teacher view (distillation)
    HarborDataset.get_batch(i)        -> groups_per_batch HarborEnvGroupBuilders
    HarborEnvGroupBuilder.make_envs() -> group_size AgentToolMessageEnvs, one sandbox each

Sandboxes are created concurrently and always released: each env closes its sandbox in
``on_close`` (the rollout closes every env, also after errors and cancellation), and
``make_envs`` closes whatever it created when it fails or is cancelled half-way.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

import anyio
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from envs.harbor.bash_tool import (
    DEFAULT_COMMAND_TIMEOUT_S,
    DEFAULT_MAX_OUTPUT_CHARS,
    HarborBashTool,
)
from envs.harbor.grader import HarborGrader
from envs.harbor.tasks import BUNDLED, HarborTask, bundled_split, load_tasks, split_tasks
from envs.harbor.teacher_view import DEFAULT_TEMPLATE, TeacherView
from sandboxes.errors import SandboxBuildError, SandboxError
from sandboxes.factory import check_backend_name, make_factory
from sandboxes.types import Sandbox, SandboxFactory
from tool_use.agent_env import AgentToolMessageEnv, ParseErrorPolicy, zero_reward
from tool_use.errors import EnvironmentFailure
from tool_use.trajectory import Trajectory
from tool_use.types import Message, RewardFn

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = """\
You are an expert Linux user working in a terminal on a Debian machine. Solve the user's task \
by calling the bash tool: run one command per call, read its output, and continue until the \
task is done. Use absolute paths. When the task is complete, reply with a short summary and \
no tool call."""


SandboxBackend = Annotated[str, AfterValidator(check_backend_name)]
"""A ``backend`` value: local, docker, harbor:<type> (a type Harbor knows) or an importable
module:attr, checked when the config is validated (``sandboxes.factory.check_backend_name``)."""


class RewardMode(StrEnum):
    """Where an episode's reward comes from."""

    VERIFIER = "verifier"
    """The task's own tests/test.sh, graded exactly like Harbor (RL and evaluation)."""
    ZERO = "zero"
    """Always 0: distillation, where the teacher's per-token scores are the signal."""


class HarborEnvConfig(BaseModel):
    """Every knob of Harbor environments; flat so that ``key=value`` CLIs can set each one."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=lambda: [BUNDLED])
    """Task sources: task dirs, dataset folders, registry.json files, ``bundled[:train|:test]``.
    Plain ``bundled`` trains on the suite's train split and evaluates on its test split."""
    eval_tasks: list[str] = Field(default_factory=list)
    """Evaluation task sources (take precedence over ``test``/``test_fraction``)."""
    test: list[str] = Field(default_factory=list)
    """Names or globs of ``tasks`` held out for evaluation."""
    test_fraction: float | None = None
    """Hold out this seeded fraction of ``tasks`` for evaluation instead."""
    backend: SandboxBackend = "local"
    """Sandbox backend for ``sandboxes.factory.make_factory``: local, docker, harbor:<type>, ..."""
    group_size: int = Field(4, ge=1)
    groups_per_batch: int = Field(8, ge=1)
    epochs: int = Field(1, ge=1)
    seed: int = 0
    """Seeds the per-epoch shuffle and the ``test_fraction`` split."""
    shuffle: bool = True
    eval_group_size: int = Field(1, ge=1)
    max_turns: int = Field(10, ge=1)
    max_tool_calls: int | None = None
    parse_error_policy: ParseErrorPolicy = ParseErrorPolicy.END
    command_timeout_s: float = Field(DEFAULT_COMMAND_TIMEOUT_S, gt=0)
    """Per bash command; the task's ``[agent].timeout_sec`` caps the episode's total."""
    max_output_chars: int = Field(DEFAULT_MAX_OUTPUT_CHARS, ge=100)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    teacher_template: str | None = None
    """Privileged teacher prompt (``envs.harbor.teacher_view``); None: the teacher sees what
    the student sees. The distillation builder defaults it to ``DEFAULT_TEMPLATE``."""
    stop_agent_processes: bool = True
    """Kill what the agent left running before the tests run (see ``HarborGrader``)."""
    sandbox_retries: int = Field(1, ge=0)
    """Extra attempts when starting a sandbox fails (build errors are not retried)."""

    @model_validator(mode="after")
    def _check(self) -> HarborEnvConfig:
        if not self.tasks:
            raise ValueError("tasks: give at least one task source")
        if self.test_fraction is not None and self.test:
            raise ValueError("give either test (names/globs) or test_fraction, not both")
        if self.teacher_template is not None:
            TeacherView(self.teacher_template)  # raises on unknown fields
        return self


# ---- one task, one group ------------------------------------------------------------------


@dataclass
class HarborEnvGroupBuilder:
    """``group_size`` episodes of one task, each in its own sandbox."""

    task: HarborTask
    factory: SandboxFactory
    config: HarborEnvConfig
    reward_mode: RewardMode = RewardMode.VERIFIER
    group_size: int | None = None
    """Overrides ``config.group_size`` (evaluation uses ``eval_group_size``)."""
    grader: HarborGrader = field(init=False)

    def __post_init__(self) -> None:
        self.grader = HarborGrader(
            self.task, factory=self.factory, stop_agent_processes=self.config.stop_agent_processes
        )

    async def make_envs(self) -> list[AgentToolMessageEnv]:
        size = self.group_size or self.config.group_size
        sandboxes: list[Sandbox | None] = [None] * size
        ok = False
        try:
            try:
                async with anyio.create_task_group() as group:
                    for index in range(size):
                        group.start_soon(self._create_into, sandboxes, index)
            except BaseExceptionGroup as errors:
                failure = _first_failure(errors)
                if failure is None:
                    raise
                raise failure from errors
            envs = [self._env(sandbox) for sandbox in sandboxes if sandbox is not None]
            ok = True
            return envs
        finally:
            if not ok:
                with anyio.CancelScope(shield=True):
                    for sandbox in sandboxes:
                        if sandbox is not None:
                            await self._close(sandbox)

    async def compute_group_rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        return [0.0] * len(trajectories)

    def logging_tags(self) -> list[str]:
        # Not the task's name: a tag per task would log every metric once per task and step.
        # The task is in each episode's metadata["task"] (rollout files, per-task analysis).
        return ["harbor"]

    # ---- internals ------------------------------------------------------------------------

    async def _create_into(self, slots: list[Sandbox | None], index: int) -> None:
        spec = self.task.sandbox_spec
        for attempt in range(self.config.sandbox_retries + 1):
            try:
                sandbox = await self.factory.create(spec)
            except SandboxError as exc:
                if attempt < self.config.sandbox_retries and not isinstance(exc, SandboxBuildError):
                    logger.warning("creating a sandbox for %s failed, retrying: %s", spec.name, exc)
                    continue
                raise EnvironmentFailure(
                    f"task {self.task.name!r}: could not create a sandbox "
                    f"({self.config.backend} backend): {exc}",
                    kind="sandbox",
                ) from exc
            slots[index] = sandbox
            try:
                await self.grader.record_baseline(sandbox)
            except SandboxError as exc:
                raise EnvironmentFailure(
                    f"task {self.task.name!r}: a new sandbox failed: {exc}", kind="sandbox"
                ) from exc
            return

    def _env(self, sandbox: Sandbox) -> AgentToolMessageEnv:
        config = self.config
        bash = HarborBashTool(
            sandbox,
            command_timeout_s=config.command_timeout_s,
            agent_timeout_s=self.task.agent_timeout_s,
            max_output_chars=config.max_output_chars,
        )
        student = [
            Message(role="system", content=config.system_prompt),
            Message(role="user", content=self.task.instruction.strip()),
        ]
        teacher = (
            TeacherView(config.teacher_template).messages(self.task, student)
            if config.teacher_template is not None
            else None
        )

        async def close() -> None:
            with anyio.CancelScope(shield=True):
                await self._close(sandbox)

        return AgentToolMessageEnv(
            initial_messages=student,
            tools=[bash.bash],
            reward_fn=self._reward_fn(sandbox),
            max_turns=config.max_turns,
            max_tool_calls=config.max_tool_calls,
            parse_error_policy=config.parse_error_policy,
            teacher_messages=teacher,
            metadata={
                "task": self.task.name,
                "reward_mode": str(self.reward_mode),
                "teacher_view": "privileged" if teacher is not None else "student",
            },
            on_close=close,
        )

    def _reward_fn(self, sandbox: Sandbox) -> RewardFn:
        if self.reward_mode is RewardMode.ZERO:
            return zero_reward

        async def verifier_reward(messages: Sequence[Message]) -> float:
            return await self.grader.reward(sandbox)

        return verifier_reward

    async def _close(self, sandbox: Sandbox) -> None:
        self.grader.forget(sandbox)
        try:
            await sandbox.close()
        except Exception:  # a close that fails must not hide the episode's own outcome
            logger.exception("closing the sandbox of task %s failed", self.task.name)


def _first_failure(errors: BaseExceptionGroup) -> EnvironmentFailure | None:
    for error in errors.exceptions:
        if isinstance(error, EnvironmentFailure):
            return error
        if isinstance(error, BaseExceptionGroup) and (found := _first_failure(error)):
            return found
    return None


# ---- datasets -----------------------------------------------------------------------------


class HarborDataset:
    """Batches of ``groups_per_batch`` group builders over ``epochs`` passes of the tasks.

    Each epoch is a fresh permutation (seeded by ``seed`` and the epoch) when ``shuffle``;
    batches run straight across epoch boundaries, so only the last one can be short."""

    def __init__(
        self,
        builders: Sequence[HarborEnvGroupBuilder],
        *,
        groups_per_batch: int,
        epochs: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if not builders:
            raise ValueError("HarborDataset needs at least one task")
        self.builders = list(builders)
        self.groups_per_batch = groups_per_batch
        self.epochs = epochs
        self.order: list[int] = []
        for epoch in range(epochs):
            indices = list(range(len(self.builders)))
            if shuffle:
                random.Random(f"{seed}:{epoch}").shuffle(indices)
            self.order.extend(indices)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.groups_per_batch)

    def get_batch(self, index: int) -> list[HarborEnvGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: the dataset has {len(self)} batches")
        start = index * self.groups_per_batch
        return [self.builders[i] for i in self.order[start : start + self.groups_per_batch]]


class HarborDatasetBuilder:
    """Train and eval datasets of Harbor tasks rewarded by their verifiers (RL, evaluation)."""

    reward_mode = RewardMode.VERIFIER

    def __init__(self, config: HarborEnvConfig, factory: SandboxFactory | None = None) -> None:
        self.config = self._with_defaults(config)
        self.factory = factory

    def __call__(self) -> tuple[HarborDataset, HarborDataset | None]:
        config = self.config
        train, test = self.load_split()
        factory = self.factory or make_factory(config.backend)
        train_set = HarborDataset(
            [HarborEnvGroupBuilder(t, factory, config, self.reward_mode) for t in train],
            groups_per_batch=config.groups_per_batch,
            epochs=config.epochs,
            shuffle=config.shuffle,
            seed=config.seed,
        )
        if not test:
            return train_set, None
        eval_set = HarborDataset(
            [
                HarborEnvGroupBuilder(
                    t, factory, config, RewardMode.VERIFIER, group_size=config.eval_group_size
                )
                for t in test
            ],
            groups_per_batch=config.groups_per_batch,
            shuffle=False,
        )
        return train_set, eval_set

    def load_split(self) -> tuple[list[HarborTask], list[HarborTask]]:
        """(train tasks, eval tasks) as the config asks; raises ``EnvsError`` subclasses."""
        config = self.config
        if config.eval_tasks:
            return load_tasks(*config.tasks), load_tasks(*config.eval_tasks)
        if config.tasks == [BUNDLED] and not config.test and config.test_fraction is None:
            split = bundled_split()
            return split.train, split.test
        tasks = load_tasks(*config.tasks)
        if config.test or config.test_fraction is not None:
            split = split_tasks(
                tasks,
                test=config.test or None,
                test_fraction=config.test_fraction,
                seed=config.seed,
            )
            return split.train, split.test
        return tasks, []

    @staticmethod
    def _with_defaults(config: HarborEnvConfig) -> HarborEnvConfig:
        return config


class HarborDistillationDatasetBuilder(HarborDatasetBuilder):
    """Train episodes with zero reward (the teacher's scores are the signal; parse errors and
    context overflow show up only as metrics) and the privileged teacher view by default.
    The eval split, if any, is still rewarded by the verifier."""

    reward_mode = RewardMode.ZERO

    @staticmethod
    def _with_defaults(config: HarborEnvConfig) -> HarborEnvConfig:
        if "teacher_template" in config.model_fields_set:
            return config
        return config.model_copy(update={"teacher_template": DEFAULT_TEMPLATE})
