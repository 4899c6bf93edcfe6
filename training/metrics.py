"""What a run writes down: per-step metrics, rollouts, the config; progress bars.

    <log_path>/config.json              the full resolved config
    <log_path>/metrics.jsonl            one JSON object per step (and per eval)
    <log_path>/rollouts/step_0003.jsonl the step's trajectories (``Trajectory.to_json``)
    <log_path>/rollouts/eval_0003.jsonl evaluation episodes after 3 steps

``rollout_metrics`` turns a batch of trajectories into the numbers every recipe logs: episodes
(valid and invalid), ``failure/<kind>`` counts, ``stop/<reason>`` fractions, tokens (student /
env), and per-episode means of what the envs measured (turns, tool calls, ``tool_error/<kind>``,
parse errors, bash commands, ...). The same numbers per logging tag (``EnvGroupBuilder.
logging_tags``) go under ``<tag>/``: ``by_tag``, ``tagged``. wandb is optional and imported only
when asked for.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tool_use.trajectory import Trajectory, write_jsonl
from training.errors import TrainingError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
ROLLOUTS_DIR = "rollouts"


def rollout_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Numbers about a batch of episodes (invalid ones included where it says so).

    - ``episodes``, ``episodes/valid``, ``episodes/invalid``; ``failure/<kind>`` (counts);
    - ``stop/<reason>``: fraction of all episodes that ended that way;
    - ``tokens/student`` (sampled, mask 1) and ``tokens/env`` (prompt, tool results, forced
      prefixes) summed over valid episodes; ``tokens/per_episode``;
    - ``reward/mean`` over valid episodes;
    - every other key an env reported (``turns``, ``tool_calls``, ``tool_error/<kind>``,
      ``parse_errors``, ``bash/commands``, ...): its mean per valid episode, as ``env/<key>``,
      over the episodes of the builders whose envs report it (``metadata["builder"]``): in a
      mixture, a token env that reports no ``turns`` does not dilute the message envs' mean,
      while a count an env reports only when it happens (``tool_error/timeout``) is still a
      rate over all the episodes of that builder.
    """
    total = len(trajectories)
    valid = [t for t in trajectories if t.valid]
    out: dict[str, float] = {
        "episodes": float(total),
        "episodes/valid": float(len(valid)),
        "episodes/invalid": float(total - len(valid)),
    }
    stops: dict[str, float] = defaultdict(float)
    sums: dict[str, float] = defaultdict(float)
    episodes: dict[Any, int] = defaultdict(int)  # valid episodes per builder
    reported: dict[str, set[Any]] = defaultdict(set)  # key -> the builders whose envs report it
    for trajectory in trajectories:
        for key, value in trajectory.metrics.items():
            if key.startswith("failure/"):
                out[key] = out.get(key, 0.0) + value
        if trajectory.stop_reason is not None:
            stops[f"stop/{trajectory.stop_reason}"] += 1.0
    for trajectory in valid:
        builder = trajectory.metadata.get("builder")
        episodes[builder] += 1
        for key, value in trajectory.metrics.items():
            if not key.startswith(("stop/", "failure/")):
                sums[key] += value
                reported[key].add(builder)
    for key, count in stops.items():
        out[key] = count / max(total, 1)
    for key, value in sums.items():
        out[f"env/{key}"] = value / sum(episodes[builder] for builder in reported[key])
    student = sum(t.num_sampled_tokens for t in valid)
    every = sum(len(seq) for t in valid for seq in t.sequences)
    out["tokens/student"] = float(student)
    out["tokens/env"] = float(every - student)
    out["tokens/per_episode"] = every / max(len(valid), 1)
    out["reward/mean"] = sum(t.reward for t in valid) / max(len(valid), 1)
    return out


def by_tag[T](items: Iterable[T], metadata: Callable[[T], Mapping[str, Any]]) -> dict[str, list[T]]:
    """``items`` (trajectories, scored sequences) under each logging tag their
    ``metadata["tags"]`` carries (``do_rollouts`` copies each group's tags there), in order."""
    out: dict[str, list[T]] = {}
    for item in items:
        for tag in metadata(item).get("tags", ()):
            out.setdefault(tag, []).append(item)
    return out


def tagged(metrics: Mapping[str, float], tag: str, prefix: str = "") -> dict[str, float]:
    """``metrics`` of one tag's episodes as ``<prefix><tag>/<key>``."""
    return {f"{prefix}{tag}/{key}": value for key, value in metrics.items()}


def success_metrics(trajectories: Sequence[Trajectory], prefix: str = "eval/") -> dict[str, float]:
    """Verifier outcomes: ``success_rate`` (fraction of graded valid episodes with reward 1)
    and ``reward_mean``, with the rollout metrics under the same prefix. Episodes whose
    ``metadata["graded"]`` is False (prompt rows without an expected answer) are not graded."""
    graded = [t for t in trajectories if t.valid and t.metadata.get("graded", True)]
    solved = sum(1 for t in graded if t.reward >= 1.0 - 1e-9)
    out = {
        f"{prefix}{k}": v for k, v in rollout_metrics(trajectories).items() if k != "reward/mean"
    }
    out[f"{prefix}success_rate"] = solved / len(graded) if graded else math.nan
    out[f"{prefix}reward_mean"] = (
        sum(t.reward for t in graded) / len(graded) if graded else math.nan
    )
    return out


def tagged_success_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """``success_metrics`` over every episode (``eval/...``) and over each logging tag's
    (``eval/<tag>/...``)."""
    split: dict[str, float] = {}
    for tag, members in by_tag(trajectories, lambda t: t.metadata).items():
        split.update(success_metrics(members, prefix=f"eval/{tag}/"))
    return {**success_metrics(trajectories), **split}


def weighted_mean(parts: Iterable[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """Average dicts of metrics, each weighted (e.g. by its micro-batch's token count); keys
    ending in ``_min`` or ``_max`` are extremes, so they take the min or max over the parts
    with a positive weight instead."""
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    extremes: dict[str, float] = {}
    for metrics, weight in parts:
        for key, value in metrics.items():
            sums[key] += value * weight
            weights[key] += weight
            pick = min if key.endswith("_min") else max if key.endswith("_max") else None
            if pick is not None and weight > 0:
                extremes[key] = pick(extremes.get(key, value), value)
    means = {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
    return {**means, **extremes}


class Timer:
    """Wall time per phase: ``with timer("rollout"): ...`` gives ``time/rollout``."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start


def progress(total: int, desc: str, *, enabled: bool, unit: str = "it") -> tqdm:
    """A transient progress bar (cleared when done), or a silent one when not ``enabled``."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not enabled)


class RunLogger:
    """Writes a run's log dir; mirrors metrics to wandb when ``wandb_project`` is set."""

    def __init__(
        self,
        log_path: str | Path,
        *,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.log_path.mkdir(parents=True, exist_ok=True)
        (self.log_path / ROLLOUTS_DIR).mkdir(exist_ok=True)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as error:
                raise TrainingError(
                    f"wandb_project={wandb_project!r} needs the wandb package: "
                    "pip install 'apprentice[wandb]' (or leave wandb_project unset)"
                ) from error
            self.wandb = wandb.init(
                project=wandb_project,
                name=wandb_run_name or self.log_path.name,
                config=dict(config or {}),
                dir=str(self.log_path),
                resume="allow",
            )

    @property
    def metrics_file(self) -> Path:
        return self.log_path / METRICS_FILE

    def write_config(self, config: Mapping[str, Any]) -> None:
        (self.log_path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resumed run redoes them)."""
        if not self.metrics_file.is_file():
            return
        kept = [
            line
            for line in self.metrics_file.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.metrics_file.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.metrics_file.open("a") as out:
            out.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def write_rollouts(self, name: str, trajectories: Iterable[Trajectory]) -> Path:
        path = self.log_path / ROLLOUTS_DIR / f"{name}.jsonl"
        write_jsonl(path, trajectories)
        return path

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(log_path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, in order."""
    path = Path(log_path) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: float) -> float | None:
    """JSON has no NaN: missing values are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None
