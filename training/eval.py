"""Evaluation: the student's episodes on held-out tasks, rewarded by their verifiers.

Every batch of the eval dataset is rolled out with the student (greedy by default, so before
and after are comparable on a small task set) and summarised by ``success_metrics``:
``eval/success_rate`` (fraction of valid episodes with reward 1), ``eval/reward_mean`` and the
rollout metrics (invalid episodes, stop reasons, turns, tool errors) under ``eval/``, and the
same per logging tag under ``eval/<tag>/``.
``pass_at_k`` is the unbiased pass@k estimator for several attempts per task.
"""

from __future__ import annotations

from envs.types import Dataset
from tool_use.renderers.base import Renderer
from tool_use.trajectory import Trajectory
from training.metrics import tagged_success_metrics
from training.rollouts import Policy, RolloutSettings, do_rollouts, get_batch


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
    builders = [b for index in range(len(dataset)) for b in get_batch(dataset, index)]
    groups = await do_rollouts(
        builders,
        policy,
        renderer,
        settings or RolloutSettings(),
        progress="eval" if progress else None,
    )
    trajectories: list[Trajectory] = [t for group in groups for t in group.trajectories]
    return tagged_success_metrics(trajectories), trajectories


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` attempts of which ``c`` succeeded (Chen et al.,
    2021): ``1 - C(n - c, k) / C(n, k)``, the chance that ``k`` attempts drawn without
    replacement include a success; computed as a product, so large ``n`` neither overflows nor
    loses precision."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    failing = 1.0
    for i in range(n - c + 1, n + 1):
        failing *= 1.0 - k / i
    return 1.0 - failing
