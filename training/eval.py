"""Evaluation: the student's episodes on held-out tasks, rewarded by their verifiers.

Every batch of the eval dataset is rolled out with the student (greedy by default, so before
and after are comparable on a small task set) and summarised by ``success_metrics``:
``eval/success_rate`` (fraction of valid episodes with reward 1), ``eval/reward_mean`` and the
rollout metrics (invalid episodes, stop reasons, turns, tool errors) under ``eval/``.
"""

from __future__ import annotations

from envs.types import Dataset
from tool_use.renderers.base import Renderer
from tool_use.trajectory import Trajectory
from training.metrics import success_metrics
from training.rollouts import Policy, RolloutSettings, do_rollouts


async def evaluate(
    dataset: Dataset,
    policy: Policy,
    renderer: Renderer,
    settings: RolloutSettings | None = None,
    *,
    progress: bool = False,
) -> tuple[dict[str, float], list[Trajectory]]:
    """``(metrics, trajectories)`` over every batch of ``dataset``, all run concurrently (the
    sandbox factory bounds how many are created at once; the sampler batches their turns)."""
    builders = [b for index in range(len(dataset)) for b in dataset.get_batch(index)]
    groups = await do_rollouts(
        builders,
        policy,
        renderer,
        settings or RolloutSettings(),
        progress="eval" if progress else None,
    )
    trajectories: list[Trajectory] = [t for group in groups for t in group.trajectories]
    return success_metrics(trajectories), trajectories
