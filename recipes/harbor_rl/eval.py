"""Success rate and pass@k of any model or checkpoint on a set of Harbor tasks.

    python -m recipes.harbor_rl.eval [model_name=NAME|FOLDER|RUN] [tasks=bundled:test] [k=1,4]

``model_name`` is a Hugging Face id or model folder (a run's ``export/merged``), a LoRA adapter
folder (a run's ``export/adapter``; ``base_model`` overrides the base it names), a checkpoint
folder or a whole run folder of ours (its newest checkpoint) — see ``training.weights``. Each
task is attempted ``samples`` times (default: the largest k) at ``temperature`` and graded by its
own verifier; invalid episodes (a sandbox or the grader failed) are counted and left out.

Per task: ``success_rate`` = solved / valid attempts and, for each k, the unbiased pass@k
estimate ``1 - C(n - c, k) / C(n, k)`` (n valid attempts, c solved; Chen et al. 2021), left out
when n < k. Overall: their means over tasks. Prints a table and writes ``results.json``,
the episodes (``rollouts/eval_0000.jsonl``), ``report.png`` (success per task) and
``rollouts.html`` into ``log_path``.

``sampler=vllm`` samples with vLLM's engine in this process (it starts on the base model and
takes the loaded weights in place); ``sampler=URL`` asks a vLLM server that serves
``model_name`` (a plain model: adapters and checkpoints are merged here, and merged weights
cannot travel over HTTP).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.table import Table

from envs.harbor.builders import HarborEnvConfig, HarborEnvGroupBuilder
from envs.harbor.tasks import HarborTask, load_tasks
from recipes.cli import ConfigError, RecipeConfig, dump_config
from recipes.common import (
    Dtype,
    ModelName,
    SamplerChoice,
    Student,
    check_served_name,
    cli,
    close_sampler,
    is_server_url,
    make_sampler,
)
from recipes.distillation.harbor_multi_turn import check_backend
from sandboxes.types import SandboxFactory
from tool_use.renderers import get_renderer
from tool_use.renderers.base import Renderer
from tool_use.trajectory import Trajectory, write_jsonl
from tool_use.types import ToolChoice
from training import models
from training.eval import pass_at_k
from training.reports import REPORT_PNG, plot_task_success, write_rollout_viewer
from training.rollouts import RolloutSettings, SamplerPolicy, do_rollouts
from training.types import Sampler
from training.weights import load_weights

RECIPE = "harbor_rl_eval"


class Config(RecipeConfig):
    """Success rate and pass@k of a model or checkpoint on Harbor tasks."""

    model_name: ModelName = models.EMBEDDED_MODEL
    """A model id or folder, a LoRA adapter folder, a checkpoint folder or a run folder."""
    base_model: str | None = None
    """The base an adapter or checkpoint sits on (default: the one it names)."""
    tasks: list[str] = Field(default_factory=lambda: ["bundled:test"])
    """Task sources: task dirs, dataset folders, registry.json, bundled[:train|:test]."""
    k: list[int] = Field(default_factory=lambda: [1])
    """The k of pass@k (each <= samples)."""
    samples: int | None = Field(None, ge=1)
    """Attempts per task (default: the largest k)."""
    temperature: float | None = Field(None, ge=0.0)
    """Sampling temperature (default: 0, greedy, with one sample; 1 with several)."""
    backend: str = "local"
    """Sandbox backend: local (bubblewrap), docker, harbor:<type>, module:attr."""
    max_turns: int = Field(10, ge=1)
    """Assistant turns per episode."""
    max_tokens: int = Field(256, ge=1)
    """Sampling budget of one assistant turn."""
    max_trajectory_tokens: int | None = Field(2048, ge=2)
    """Budget of one episode's context."""
    tool_choice: ToolChoice = "auto"
    """auto | required (every turn opens a tool call) | none."""
    command_timeout_s: float = Field(30.0, gt=0)
    """Timeout of one bash command."""
    tasks_at_once: int = Field(8, ge=1)
    """Tasks whose episodes run concurrently."""
    renderer: str | None = None
    """Chat-template renderer (None: detected from the tokenizer)."""
    dtype: Dtype = "auto"
    """auto | bf16 | fp32 | fp16."""
    sampler: SamplerChoice = "hf"
    """Who samples the episodes: hf (this process) | vllm (vLLM's engine in this process) | the
    http(s) URL of a vLLM server serving model_name."""
    sampler_served_name: str | None = None
    """The model name the sampler server serves (default: model_name)."""
    seed: int = 0
    """Seeds sampling."""
    log_path: str | None = None
    """Where results.json, rollouts/ and rollouts.html go (default runs/harbor_rl_eval-<time>)."""

    _served_name = field_validator("sampler_served_name")(check_served_name)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.k or any(k < 1 for k in self.k):
            raise ValueError("k: give one or more positive integers")
        if self.samples is not None and max(self.k) > self.samples:
            raise ValueError(f"k={max(self.k)} needs samples >= {max(self.k)}")
        return self

    @property
    def attempts(self) -> int:
        return self.samples or max(self.k)

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.attempts == 1 else 1.0


def task_results(
    names: list[str], trajectories: list[Trajectory], ks: list[int]
) -> list[dict[str, Any]]:
    """One row per task: attempts, valid, solved, success_rate and pass@k."""
    rows = []
    for name in names:
        mine = [t for t in trajectories if t.metadata.get("task") == name]
        valid = [t for t in mine if t.valid]
        solved = sum(1 for t in valid if t.reward >= 1.0 - 1e-9)
        row: dict[str, Any] = {
            "task": name,
            "attempts": len(mine),
            "valid": len(valid),
            "solved": solved,
            "success_rate": solved / len(valid) if valid else None,
        }
        for k in ks:
            row[f"pass@{k}"] = pass_at_k(len(valid), solved, k) if len(valid) >= k else None
        rows.append(row)
    return rows


def overall(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    """Means over the tasks that have a value."""
    out: dict[str, Any] = {
        "tasks": len(rows),
        "attempts": sum(r["attempts"] for r in rows),
        "invalid": sum(r["attempts"] - r["valid"] for r in rows),
    }
    for key in ["success_rate", *[f"pass@{k}" for k in ks]]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def table(rows: list[dict[str, Any]], total: dict[str, Any], ks: list[int], title: str) -> Table:
    out = Table(title=title)
    columns = ["task", "valid", "solved", "success", *[f"pass@{k}" for k in ks]]
    for column in columns:
        out.add_column(column, justify="left" if column == "task" else "right")

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    for r in rows:
        out.add_row(
            r["task"],
            f"{r['valid']}/{r['attempts']}",
            str(r["solved"]),
            fmt(r["success_rate"]),
            *[fmt(r[f"pass@{k}"]) for k in ks],
        )
    out.add_section()
    out.add_row(
        f"all ({total['tasks']} tasks)",
        f"{total['attempts'] - total['invalid']}/{total['attempts']}",
        "",
        fmt(total["success_rate"]),
        *[fmt(total[f"pass@{k}"]) for k in ks],
        style="bold",
    )
    return out


async def attempt_tasks(
    config: Config,
    tasks: list[HarborTask],
    factory: SandboxFactory,
    env_config: HarborEnvConfig,
    sampler: Sampler,
    renderer: Renderer,
) -> list[Trajectory]:
    """Every attempt at every task, ``tasks_at_once`` tasks at a time."""
    policy = SamplerPolicy(sampler, temperature=config.sampling_temperature)
    settings = RolloutSettings(
        max_tokens=config.max_tokens,
        max_trajectory_tokens=config.max_trajectory_tokens,
        tool_choice=config.tool_choice,
    )
    builders = [HarborEnvGroupBuilder(task, factory, env_config) for task in tasks]
    trajectories: list[Trajectory] = []
    for start in range(0, len(builders), config.tasks_at_once):
        groups = await do_rollouts(
            builders[start : start + config.tasks_at_once],
            policy,
            renderer,
            settings,
            progress="eval",
        )
        trajectories += [t for group in groups for t in group.trajectories]
    return trajectories


async def main(config: Config) -> dict[str, Any]:
    log_path = Path(config.log_path or f"runs/{RECIPE}-{time.strftime('%Y%m%d-%H%M%S')}")
    factory = check_backend(config.backend)
    tasks = load_tasks(*config.tasks)
    env_config = HarborEnvConfig(
        tasks=config.tasks,
        backend=config.backend,
        group_size=config.attempts,
        max_turns=config.max_turns,
        command_timeout_s=config.command_timeout_s,
        seed=config.seed,
    )
    loaded = load_weights(config.model_name, base_model=config.base_model, dtype=config.dtype)
    if loaded.kind != "model" and is_server_url(config.sampler):
        raise ConfigError(
            f"sampler={config.sampler} samples the model that server serves, but "
            f"model_name={config.model_name} names {loaded.kind} weights, merged in this "
            "process, which cannot travel over HTTP; serve them (a run's export/merged, or its "
            "base with --lora-modules NAME=export/adapter and sampler_served_name=NAME) and "
            "pass the served model, or use sampler=hf or vllm"
        )
    torch.manual_seed(config.seed)
    renderer = get_renderer(config.renderer, loaded.tokenizer)
    student = Student(loaded.model, loaded.tokenizer, renderer)
    sampler = make_sampler(config, student, config.seed, base_model=loaded.base_model)
    try:
        if loaded.kind != "model":  # a vLLM engine started on the base: the loaded weights
            await sampler.update_weights(loaded.model)
        trajectories = await attempt_tasks(config, tasks, factory, env_config, sampler, renderer)
    finally:
        await close_sampler(sampler)
    rows = task_results([t.name for t in tasks], trajectories, config.k)
    total = overall(rows, config.k)
    results = {
        "model": config.model_name,
        "loaded": {"kind": loaded.kind, "base_model": loaded.base_model},
        "temperature": config.sampling_temperature,
        "samples": config.attempts,
        "overall": total,
        "tasks": rows,
        "config": dump_config(config),
    }
    (log_path / "rollouts").mkdir(parents=True, exist_ok=True)
    write_jsonl(log_path / "rollouts" / "eval_0000.jsonl", trajectories)
    (log_path / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    plot_task_success(rows, log_path / REPORT_PNG, title=f"{config.model_name}")
    write_rollout_viewer(log_path, tokenizer=loaded.tokenizer)
    title = f"{config.model_name} on {', '.join(config.tasks)}"
    Console().print(table(rows, total, config.k, title))
    print(f"results: {log_path / 'results.json'}  episodes: {log_path / 'rollouts.html'}")
    return results


if __name__ == "__main__":
    raise SystemExit(cli(main, Config))
