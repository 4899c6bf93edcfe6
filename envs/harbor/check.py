"""Checking task directories: run Harbor's oracle or no-op agent, then grade.

The oracle does what Harbor's ``OracleAgent`` does: upload ``solution/`` to ``/solution``,
make ``solve.sh`` executable and run it with output in ``/logs/agent/oracle.txt``, under the
task's agent timeout, with ``[solution].env``; a failing or timed-out solution is recorded and
the task is graded anyway (as Harbor's trial does). The no-op agent does nothing. A healthy
task scores 1 with the oracle and 0 with the no-op. A task that cannot be checked says why in
``CheckResult.failure``: no solution for the oracle, a sandbox that could not be built or
started, or tests that gave no reward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import anyio
from harbor.utils.env import resolve_env_vars

from envs.harbor.grader import HarborGrader
from envs.harbor.tasks import HarborTask
from sandboxes.errors import SandboxError
from sandboxes.types import Sandbox, SandboxFactory
from tool_use.errors import EnvironmentFailure

SOLUTION_DIR = "/solution"
ORACLE_LOG = "/logs/agent/oracle.txt"


class CheckAgent(StrEnum):
    """Which scripted agent acts before grading."""

    ORACLE = "oracle"
    """Runs the task's ``solution/solve.sh``: a healthy task scores 1."""
    NOP = "nop"
    """Does nothing: a healthy task scores 0."""


class CheckFailure(StrEnum):
    """Why a task could not be checked (``CheckResult.failure``)."""

    NO_SOLUTION = "no_solution"
    """The oracle has nothing to run: the task has no ``solution/solve.sh``."""
    SANDBOX = "sandbox"
    """The task's sandbox could not be built or started, or broke (an image that does not
    build, a backend that does not answer)."""
    GRADING = "grading"
    """The tests ran but gave no usable reward (``GradingError``: no reward file, a bad one,
    a verifier timeout)."""


@dataclass
class CheckResult:
    """One task's outcome. ``reward`` is None when the task could not be graded, and
    ``failure`` says why."""

    task: str
    reward: float | None
    rewards: dict[str, float] | None
    error: str | None
    duration_s: float
    notes: list[str] = field(default_factory=list)
    """What went wrong before grading without making grading impossible (the oracle's exit
    code or timeout)."""
    failure: CheckFailure | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "reward": self.reward,
            "rewards": self.rewards,
            "error": self.error,
            "failure": self.failure,
            "duration_s": round(self.duration_s, 3),
        }


def _failure(error: EnvironmentFailure | SandboxError) -> CheckFailure:
    if isinstance(error, EnvironmentFailure) and error.kind == "grading":
        return CheckFailure.GRADING
    return CheckFailure.SANDBOX


async def run_oracle(task: HarborTask, sandbox: Sandbox) -> str | None:
    """Run the reference solution; return a note when it failed or timed out. The task must
    have a ``solution/solve.sh`` (``check_task`` says so without a sandbox when it has none)."""
    if task.solve_script is None:
        raise ValueError(f"task {task.name!r}: the oracle needs solution/solve.sh")
    await sandbox.upload_dir(task.solution_dir, SOLUTION_DIR)
    script = f"{SOLUTION_DIR}/{task.solve_script.relative_to(task.solution_dir).as_posix()}"
    await sandbox.exec(f"chmod +x {script} && mkdir -p /logs/agent")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    if task.config.solution.env:
        env.update(resolve_env_vars(task.config.solution.env))
    result = await sandbox.exec(
        f"({script}) > {ORACLE_LOG} 2>&1", env=env, timeout=task.agent_timeout_s
    )
    if result.timed_out:
        return f"the oracle timed out after {task.agent_timeout_s:g} s"
    if result.exit_code != 0:
        return f"solve.sh exited with code {result.exit_code}"
    return None


async def check_task(
    task: HarborTask,
    factory: SandboxFactory,
    agent: CheckAgent,
    *,
    stop_agent_processes: bool = True,
) -> CheckResult:
    """Create a sandbox, run ``agent``, grade, close. Never raises for a task's own failure:
    the error is in the result."""
    start = time.monotonic()
    if agent is CheckAgent.ORACLE and task.solve_script is None:
        missing = "the oracle has nothing to run: the task has no solution/solve.sh"
        return CheckResult(task.name, None, None, missing, 0.0, failure=CheckFailure.NO_SOLUTION)
    grader = HarborGrader(task, factory=factory, stop_agent_processes=stop_agent_processes)
    notes: list[str] = []
    sandbox: Sandbox | None = None
    try:
        sandbox = await factory.create(task.sandbox_spec)
        await grader.record_baseline(sandbox)
        if agent is CheckAgent.ORACLE:
            note = await run_oracle(task, sandbox)
            if note:
                notes.append(note)
        graded = await grader.grade(sandbox)
        return CheckResult(
            task.name, graded.reward, graded.rewards, None, time.monotonic() - start, notes
        )
    except (EnvironmentFailure, SandboxError) as exc:
        return CheckResult(
            task.name, None, None, str(exc), time.monotonic() - start, notes, _failure(exc)
        )
    finally:
        if sandbox is not None:
            with anyio.CancelScope(shield=True):
                grader.forget(sandbox)
                await sandbox.close()


async def check_tasks(
    tasks: Sequence[HarborTask],
    factory: SandboxFactory,
    agent: CheckAgent,
    *,
    concurrency: int = 4,
    stop_agent_processes: bool = True,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """``check_task`` for every task, at most ``concurrency`` at a time, in input order;
    ``on_result`` is called with each result as it comes (progress, partial results)."""
    results: list[CheckResult | None] = [None] * len(tasks)
    limiter = anyio.CapacityLimiter(max(1, concurrency))

    async def one(index: int, task: HarborTask) -> None:
        async with limiter:
            results[index] = await check_task(
                task, factory, agent, stop_agent_processes=stop_agent_processes
            )
            if on_result is not None:
                on_result(results[index])

    async with anyio.create_task_group() as group:
        for index, task in enumerate(tasks):
            group.start_soon(one, index, task)
    return [result for result in results if result is not None]
