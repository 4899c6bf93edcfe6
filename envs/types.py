"""The trainer-facing environment protocols.

    DatasetBuilder()  -> (train Dataset, eval Dataset | None)
    Dataset.get_batch(i) -> [EnvGroupBuilder]       one builder per task or prompt
    EnvGroupBuilder.make_envs() -> [env] * group_size
        each env is a ``tool_use.types.TokenEnv`` or a ``MessageEnv``; the trainer wraps message
        envs with the student's renderer, so most users only write message envs.

A custom environment trains through ``training.trainer.Trainer`` (and the
``recipes.distillation.on_policy`` command line, ``dataset_builder=module:attr``) by implementing
these and nothing else. Optional on an env: ``teacher_messages`` (the privileged prompt the
teacher scores under) and ``metadata`` (a dict copied into each trajectory; required when a
``envs.mixture.MixedDataset`` part routes its episodes to a teacher). Every call into this code
is bounded by the trainer's ``env_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tool_use.trajectory import Trajectory
from tool_use.types import MessageEnv, TokenEnv

Env = TokenEnv | MessageEnv


@runtime_checkable
class EnvGroupBuilder(Protocol):
    """Makes ``group_size`` envs for one task or prompt. Envs are closed by the rollout."""

    async def make_envs(self) -> Sequence[Env]:
        """A non-empty list of envs (``MessageEnv`` or ``TokenEnv``). Raise ``EnvironmentFailure``
        when the infrastructure fails (the group then counts as one invalid episode); when it is
        cancelled (a timeout), release what it already created."""
        ...

    async def compute_group_rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        """Rewards that need the whole group (pairwise preferences, ...): one finite number per
        (valid) trajectory, added to its own reward; return zeros when there are none."""
        ...

    def logging_tags(self) -> list[str]:
        """Names that split the metrics: every step's numbers are also logged, over the groups
        carrying a tag, as ``<tag>/<metric>`` (e.g. the dataset or task family; not one tag per
        task, which multiplies the metrics by the tasks)."""
        ...


@runtime_checkable
class Dataset(Protocol):
    """Batches of env group builders, indexed by step (batch ``i`` is always the same, so a
    resumed run repeats it exactly)."""

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        """A non-empty list (any iterable is read once) of builders, for every ``index`` below
        ``len(self)``."""
        ...

    def __len__(self) -> int:
        """The number of batches (an epoch); the trainer wraps around after it."""
        ...


@runtime_checkable
class DatasetBuilder(Protocol):
    """Builds the train dataset and an optional eval dataset (called once at start-up)."""

    def __call__(self) -> tuple[Dataset, Dataset | None]: ...
