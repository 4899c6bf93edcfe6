"""Several datasets in one run, each with its own teacher route and batch share.

``MixedDataset([DatasetPart(dataset, route="math"), DatasetPart(harbor, route="agent")])``
gives batches that concatenate each part's batch ``i`` (each part keeps its own
``groups_per_batch``); every env a part with a route makes gets ``metadata[route_key] = route``,
so a routed multi-teacher (``training.teachers.multi.RoutedTeacher``) scores its episodes with
that part's teacher. A part's ``name`` (default: its route) is added to the logging tags of its
groups, so the trainer's metrics are split by part (``<name>/...``). The mixture has as many
batches as its shortest part (an epoch ends when any part runs out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envs.types import Dataset, Env, EnvGroupBuilder
from tool_use.trajectory import Trajectory
from tool_use.types import MessageEnv, TokenEnv

DEFAULT_ROUTE_KEY = "teacher"


@dataclass
class DatasetPart:
    """One dataset of a mixture and the route its episodes carry (None: their own)."""

    dataset: Dataset
    route: str | None = None
    name: str = ""
    """Added to the logging tags of the part's groups, which split the metrics (default: the
    route; no route and no name: the builders' own tags only)."""


@dataclass
class RoutedGroupBuilder:
    """A group builder whose envs carry ``metadata[route_key] = route`` (None: no route) and
    whose logging tags gain ``tag``."""

    inner: EnvGroupBuilder
    route: str | None
    route_key: str = DEFAULT_ROUTE_KEY
    tag: str = ""

    async def make_envs(self) -> Sequence[Env]:
        envs = await self.inner.make_envs()
        if self.route is None or not isinstance(envs, Sequence) or isinstance(envs, str | bytes):
            return envs  # the trainer checks what make_envs returned
        for env in envs:
            if not isinstance(env, MessageEnv | TokenEnv):
                continue  # the trainer reports it
            metadata = getattr(env, "metadata", None)
            if not isinstance(metadata, dict):
                for made in envs:
                    if isinstance(made, MessageEnv | TokenEnv):
                        await made.close()
                raise TypeError(
                    f"{type(env).__name__} has no metadata dict, so its episodes cannot carry "
                    f"the route {self.route_key}={self.route!r}; give the env a `metadata` dict"
                )
            metadata[self.route_key] = self.route
        return envs

    async def compute_group_rewards(self, trajectories: Sequence[Trajectory]) -> list[float]:
        return await self.inner.compute_group_rewards(trajectories)

    def logging_tags(self) -> list[str]:
        tags = self.inner.logging_tags()
        if not isinstance(tags, list | tuple):
            return tags  # the trainer reports it
        return [*tags, *([self.tag] if self.tag and self.tag not in tags else [])]


class MixedDataset:
    """Batch ``i`` is the concatenation of every part's batch ``i`` (implements ``Dataset``)."""

    def __init__(self, parts: Sequence[DatasetPart], *, route_key: str = DEFAULT_ROUTE_KEY) -> None:
        if not parts:
            raise ValueError("MixedDataset needs at least one dataset")
        self.parts = list(parts)
        self.route_key = route_key

    def __len__(self) -> int:
        return min(len(part.dataset) for part in self.parts)

    def get_batch(self, index: int) -> list[EnvGroupBuilder]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range: the mixture has {len(self)} batches")
        batch: list[EnvGroupBuilder] = []
        for part in self.parts:
            tag = part.name or part.route or ""
            for builder in part.dataset.get_batch(index):
                if part.route is None and not tag:
                    batch.append(builder)
                else:
                    batch.append(RoutedGroupBuilder(builder, part.route, self.route_key, tag))
        return batch
