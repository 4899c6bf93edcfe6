"""Check Harbor task directories with the oracle or the no-op agent.

    python -m recipes.harbor.check PATH... [backend=local|docker] [agent=oracle|nop]
        [output=FILE] [expect=1] [concurrency=4] [stop_agent_processes=true]

PATH is a task directory, a dataset folder, a registry.json or ``bundled[:train|:test]``.
Prints a table, writes FILE as a JSON list of ``{"task", "reward", "rewards", "error",
"duration_s"}`` (``reward`` is null when grading failed), and exits non-zero when any task
could not be graded or, with ``expect``, scored anything else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
from pydantic import Field
from rich.console import Console
from rich.table import Table

from envs.errors import EnvsError
from envs.harbor.check import CheckAgent, CheckResult, check_tasks
from envs.harbor.tasks import load_tasks
from recipes.cli import RecipeConfig, run_cli
from sandboxes.factory import make_factory


class CheckConfig(RecipeConfig):
    """Run each task with the oracle or no-op agent and grade it. Task sources may also be
    given as positional arguments: python -m recipes.harbor.check PATH... key=value..."""

    paths: list[str] = Field(min_length=1)
    """Task sources (positional arguments)."""
    backend: str = "local"
    """Sandbox backend: local (bubblewrap), docker, harbor:<type>, module:attr."""
    agent: CheckAgent = CheckAgent.ORACLE
    """oracle runs solution/solve.sh (a healthy task scores 1); nop does nothing (scores 0)."""
    output: Path | None = None
    """Where to write the JSON results."""
    expect: float | None = None
    """Fail unless every task scores exactly this (1 for oracle, 0 for nop in CI)."""
    concurrency: int = Field(4, ge=1)
    """Tasks checked at the same time."""
    stop_agent_processes: bool = True
    """Kill what the agent left running before the tests run (see envs.harbor.grader)."""


def with_paths(argv: list[str]) -> list[str]:
    """Positional ``PATH`` arguments become the ``paths`` key (as JSON: paths may hold
    commas); ``key=value`` and ``--help`` pass through to the shared recipe CLI."""
    paths = [arg for arg in argv if "=" not in arg and not arg.startswith("-")]
    rest = [arg for arg in argv if arg not in paths]
    return [f"paths={json.dumps(paths)}", *rest] if paths else rest


def exit_code(results: list[CheckResult], expect: float | None) -> int:
    if any(r.reward is None for r in results):
        return 1
    if expect is not None and any(r.reward != expect for r in results):
        return 1
    return 0


def print_table(results: list[CheckResult], config: CheckConfig, console: Console) -> None:
    table = Table(title=f"{config.agent} agent, {config.backend} backend")
    table.add_column("task")
    table.add_column("reward", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("error / notes", overflow="fold")
    for result in results:
        if result.reward is None:
            reward = "[red]error[/red]"
        elif config.expect is not None and result.reward != config.expect:
            reward = f"[red]{result.reward:g}[/red]"
        else:
            reward = f"{result.reward:g}"
        detail = result.error or "; ".join(result.notes)
        table.add_row(result.task, reward, f"{result.duration_s:.1f}", detail)
    console.print(table)
    graded = [r.reward for r in results if r.reward is not None]
    mean = sum(graded) / len(graded) if graded else float("nan")
    console.print(
        f"{len(results)} tasks, {len(results) - len(graded)} grading errors, mean reward {mean:.3f}"
    )


def main(config: CheckConfig) -> int:
    try:
        tasks = load_tasks(*config.paths)
    except EnvsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    factory = make_factory(config.backend)
    results = anyio.run(
        lambda: check_tasks(
            tasks,
            factory,
            config.agent,
            concurrency=config.concurrency,
            stop_agent_processes=config.stop_agent_processes,
        )
    )
    print_table(results, config, Console())
    if config.output is not None:
        config.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = config.output.with_name(config.output.name + ".tmp")
        tmp.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
        tmp.replace(config.output)
    return exit_code(results, config.expect)


if __name__ == "__main__":
    sys.exit(run_cli(main, CheckConfig, with_paths(sys.argv[1:])))
