"""Errors of ``envs``.

Two families, because they happen at different times and mean different things:

- ``EnvsError`` and its subclasses are raised *before* training starts (a broken task
  directory, a split that names a task that does not exist). They stop the run with a message
  naming the path or name and what was expected; nothing is silently skipped.
- ``GradingError`` is raised *inside* an episode when the verifier cannot produce a reward. It is
  a ``tool_use.errors.EnvironmentFailure`` (kind ``grading``), so the episode is marked invalid
  and counted, never scored 0.
"""

from __future__ import annotations

from pathlib import Path

from tool_use.errors import EnvironmentFailure


class EnvsError(Exception):
    """Base class of the load-time errors of this package."""


class TaskLoadError(EnvsError):
    """A task directory, dataset folder or registry cannot be loaded. ``problems`` maps each
    offending path to what is wrong with it (several broken tasks are reported at once)."""

    def __init__(self, problems: dict[Path, str]) -> None:
        self.problems = dict(problems)
        lines = [f"{path}: {problem}" for path, problem in self.problems.items()]
        if len(lines) == 1:
            message = f"cannot load Harbor task {lines[0]}"
        else:
            message = f"cannot load {len(lines)} Harbor tasks:\n  " + "\n  ".join(lines)
        super().__init__(message)


class TaskSplitError(EnvsError):
    """A train/test split names tasks that do not exist, overlaps, or leaves a side empty."""


class GradingError(EnvironmentFailure):
    """The verifier ran but produced no usable reward (missing, empty, invalid or non-finite
    reward file, a verifier timeout, a broken verifier environment). The episode is invalid."""

    def __init__(self, task: str, problem: str, test_output: str = "") -> None:
        super().__init__(f"grading task {task!r} failed: {problem}", kind="grading")
        self.task = task
        self.problem = problem
        self.test_output = test_output
        """The tail of ``/logs/verifier/test-stdout.txt``, when there was one, for debugging."""
