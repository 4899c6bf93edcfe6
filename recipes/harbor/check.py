"""Check Harbor task directories with the oracle or the no-op agent.

    python -m recipes.harbor.check PATH... [backend=local|docker] [agent=oracle|nop]
        [output=FILE] [expect=1] [concurrency=4] [stop_agent_processes=true]

PATH is a task directory, a dataset folder, a registry.json or ``bundled[:train|:test]``.
Prints a table, writes FILE as a JSON list of ``{"task", "reward", "rewards", "error",
"failure", "duration_s"}`` (``reward`` is null when the task could not be graded, and
``failure`` says why: ``no_solution``, ``sandbox`` or ``grading``), and exits with status 1 when
any task could not be graded or, with ``expect``, scored anything else (the footer names them);
2 for bad arguments or tasks that do not load; 130 on Ctrl-C.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import anyio
from pydantic import Field, field_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from envs.errors import EnvsError
from envs.harbor.builders import SandboxBackend
from envs.harbor.check import CheckAgent, CheckFailure, CheckResult, check_tasks
from envs.harbor.tasks import load_tasks
from recipes.cli import ConfigError, RecipeConfig, run_cli
from sandboxes.factory import make_factory

FAILURE_LABELS = {
    CheckFailure.NO_SOLUTION: "no solution",
    CheckFailure.SANDBOX: "sandbox error",
    CheckFailure.GRADING: "grading error",
}


class CheckConfig(RecipeConfig):
    """Run each task with the oracle or no-op agent and grade it. Task sources may also be
    given as positional arguments: python -m recipes.harbor.check PATH... key=value..."""

    paths: list[str] = Field(min_length=1)
    """Task sources (positional arguments)."""
    backend: SandboxBackend = "local"
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

    @field_validator("output")
    @classmethod
    def _a_file_path(cls, value: Path | None) -> Path | None:
        """Checked before any task runs: the results must have somewhere to go."""
        if value is None:
            return value
        if value.is_dir():
            raise ValueError("is a folder; give the path of the JSON file to write")
        existing = next(parent for parent in value.parents if parent.exists())
        if not existing.is_dir():
            raise ValueError(f"{existing} is a file, so no folder can be made in it")
        return value


def with_paths(argv: list[str]) -> list[str]:
    """Positional ``PATH`` arguments become the ``paths`` key (as JSON: paths may hold
    commas); ``key=value`` and ``--help`` pass through to the shared recipe CLI."""
    paths = [arg for arg in argv if "=" not in arg and not arg.startswith("-")]
    rest = [arg for arg in argv if arg not in paths]
    return [f"paths={json.dumps(paths)}", *rest] if paths else rest


def exit_code(results: list[CheckResult], expect: float | None) -> int:
    """1 when a task was not graded or scored other than ``expect``, else 0."""
    ungraded = any(r.reward is None for r in results)
    return 1 if ungraded or missed_expectation(results, expect) else 0


def missed_expectation(results: list[CheckResult], expect: float | None) -> list[str]:
    """The graded tasks that scored something other than ``expect``."""
    if expect is None:
        return []
    return [r.task for r in results if r.reward is not None and r.reward != expect]


def footer(results: list[CheckResult], expect: float | None) -> str:
    """``N tasks: G graded, mean reward M``, then what was not graded and why, then the tasks
    that missed ``expect``."""
    graded = [r.reward for r in results if r.reward is not None]
    tasks = f"{len(results)} task{'' if len(results) == 1 else 's'}"
    mean = f", mean reward {sum(graded) / len(graded):.3f}" if graded else ""
    parts = [f"{tasks}: {len(graded)} graded{mean}"]
    failures = Counter(FAILURE_LABELS.get(r.failure, "error") for r in results if r.reward is None)
    if failures:
        why = ", ".join(f"{label}: {count}" for label, count in failures.items())
        parts.append(f"{failures.total()} not graded ({why})")
    missed = missed_expectation(results, expect)
    if missed:
        shown = ", ".join(missed[:10]) + (", ..." if len(missed) > 10 else "")
        parts.append(f"{len(missed)} scored other than expect={expect:g}: {shown}")
    return "; ".join(parts)


def print_table(results: list[CheckResult], config: CheckConfig, console: Console) -> None:
    """The results as a table; text from tasks and tests is escaped (``[verifier]`` stays)."""
    table = Table(title=escape(f"{config.agent} agent, {config.backend} backend"))
    table.add_column("task")
    table.add_column("reward", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("error / notes", overflow="fold")
    for result in results:
        notes = list(result.notes)
        if result.reward is None:
            reward = f"[red]{FAILURE_LABELS.get(result.failure, 'error')}[/red]"
        elif config.expect is not None and result.reward != config.expect:
            reward = f"[red]{result.reward:g}[/red]"
            notes.append(f"expected {config.expect:g}")
        else:
            reward = f"{result.reward:g}"
        detail = result.error or "; ".join(notes)
        table.add_row(escape(result.task), reward, f"{result.duration_s:.1f}", escape(detail))
    console.print(table)
    console.print(escape(footer(results, config.expect)))


def write_results(results: list[CheckResult], output: Path) -> None:
    """``output`` as a JSON list, written whole or not at all (no ``.tmp`` file is left)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)


def save_partial(done: list[CheckResult], output: Path | None) -> str:
    """Writes the tasks finished before an interrupt to ``output``; says what became of it."""
    if output is None:
        return ""
    if not done:
        return f"; output={output} not written"
    try:
        write_results(done, output)
    except OSError as error:
        return f"; output={output} not written ({error})"
    return f"; their results are in output={output}"


def main(config: CheckConfig) -> int:
    try:
        tasks = load_tasks(*config.paths)
    except EnvsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        factory = make_factory(config.backend)
    except (ValueError, ImportError) as error:
        raise ConfigError(f"backend={config.backend}: {error}") from None
    done: list[CheckResult] = []
    try:
        results = anyio.run(
            lambda: check_tasks(
                tasks,
                factory,
                config.agent,
                concurrency=config.concurrency,
                stop_agent_processes=config.stop_agent_processes,
                on_result=done.append,
            )
        )
    except KeyboardInterrupt as stop:
        stop.add_note(f"after {len(done)} of {len(tasks)} tasks{save_partial(done, config.output)}")
        raise
    print_table(results, config, Console())
    if config.output is not None:
        try:
            write_results(results, config.output)
        except OSError as error:
            print(f"error: output={config.output}: cannot write it ({error})", file=sys.stderr)
            return 2
    return exit_code(results, config.expect)


if __name__ == "__main__":
    sys.exit(run_cli(main, CheckConfig, with_paths(sys.argv[1:])))
