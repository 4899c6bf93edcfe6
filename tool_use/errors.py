"""Errors of ``tool_use``.

Two different things can go wrong around a tool:

- the *model* called it badly (bad JSON, unknown name, wrong types, the tool raised, timeout):
  that is data — it becomes a tool-role message the model can read, never an exception;
- the *environment* broke (a dead sandbox, a grader that cannot produce a reward): that is
  ``EnvironmentFailure``; the episode is marked invalid and counted, never trained on.
"""

from __future__ import annotations

from tool_use.types import ToolErrorKind


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
