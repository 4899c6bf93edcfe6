"""The trainer-facing environment protocols.

    DatasetBuilder()  -> (train Dataset, eval Dataset | None)
    Dataset.get_batch(i) -> [EnvGroupBuilder]       one builder per task or prompt
    EnvGroupBuilder.make_envs() -> [env] * group_size
        each env is a ``tool_use.types.TokenEnv`` or a ``MessageEnv``; the trainer wraps message
        envs with the student's renderer, so most users only write message envs.

A custom environment plugs into every recipe by implementing these and nothing else.
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

    async def make_envs(self) -> Sequence[Env]: ...

    async def compute_group_rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        """Rewards that need the whole group (pairwise preferences, ...). Added to each
        trajectory's own reward; return zeros when there are none."""
        ...

    def logging_tags(self) -> list[str]:
        """Tags used to split metrics (e.g. the dataset or task family)."""
        ...


@runtime_checkable
class Dataset(Protocol):
    """Batches of env group builders, indexed by step."""

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]: ...

    def __len__(self) -> int: ...


@runtime_checkable
class DatasetBuilder(Protocol):
    """Builds the train dataset and an optional eval dataset (called once at start-up)."""

    def __call__(self) -> tuple[Dataset, Dataset | None]: ...
