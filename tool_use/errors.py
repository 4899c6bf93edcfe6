"""Errors of ``tool_use``.

Two different things can go wrong around a tool:

- the *model* called it badly (bad JSON, unknown name, wrong types, the tool raised, timeout):
  that is data — it becomes a tool-role message the model can read, never an exception;
- the *environment* broke (a dead sandbox, a grader that cannot produce a reward): that is
  ``EnvironmentFailure``; the episode is marked invalid and counted, never trained on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tool_use.types import ToolErrorKind

if TYPE_CHECKING:
    from tool_use.trajectory import Trajectory


class ToolUseError(Exception):
    """Base class of this package's errors."""


class ToolDefinitionError(ToolUseError, TypeError):
    """A ``@tool`` function's signature cannot be turned into a schema. Raised at decoration
    time, naming the function and the parameter."""


class ToolCallError(ToolUseError):
    """A call the model made badly. Raised inside a tool (hand-written ones too), it becomes an
    error tool message ``Error calling tool "<name>": <detail>`` with metric
    ``tool_error/<kind>``; the model sees ``detail``, so make it short and concrete."""

    def __init__(self, kind: ToolErrorKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class EnvironmentFailure(ToolUseError):
    """The environment itself failed; the episode is invalid. ``kind`` is a short metric key
    (``sandbox``, ``grading``, ``teacher``, ...)."""

    def __init__(self, message: str, kind: str = "environment") -> None:
        super().__init__(message)
        self.kind = kind


class RewardError(ToolUseError):
    """A reward function broke its contract: it raised (anything but ``EnvironmentFailure``) or
    returned something other than a finite real number. That is a bug in the env, not a broken
    machine, so it stops the run (the trainer first writes the step's episodes, the failing ones
    marked invalid, to its rollout file). The message names the function, the env and what was
    expected; a raising function's own exception is the ``__cause__``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.trajectories: list[Trajectory] = []
        """Every episode of the batch it happened in, when the trainer's rollouts raise it."""
