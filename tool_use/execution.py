"""Run one ToolCall against a set of tools, turning every way it can go wrong into data.

The model's mistakes (an unknown tool, bad arguments, a tool that raises or hangs, an enormous
output) come back as a tool-role message it can read, plus a ``tool_error/<kind>`` metric.
Only ``EnvironmentFailure`` escapes: a broken sandbox is not the model's fault, and the episode
must be dropped rather than trained on. So does a real cancellation of the episode (its task
was cancelled, or Ctrl-C), unlike a ``SystemExit`` or ``CancelledError`` the tool raised itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

import anyio

from tool_use.errors import EnvironmentFailure, ToolCallError
from tool_use.types import Message, Tool, ToolCall, ToolErrorKind, ToolResult

DEFAULT_TIMEOUT_S = 120.0
"""A tool call that runs longer is cancelled (a tool's own ``timeout_s`` takes precedence)."""
DEFAULT_MAX_OUTPUT_CHARS = 10_000
"""Longer tool output is cut in the middle (a tool's own ``max_output_chars`` takes precedence)."""

logger = logging.getLogger(__name__)


async def execute_tool_call(
    tools: Mapping[str, Tool],
    call: ToolCall,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_output_chars: int | None = DEFAULT_MAX_OUTPUT_CHARS,
) -> ToolResult:
    """Run ``call`` with the tool of that name; never raises except ``EnvironmentFailure``.

    ``timeout_s`` and ``max_output_chars`` are defaults: a tool with its own non-None
    ``timeout_s`` / ``max_output_chars`` attribute (``@tool(timeout_s=...)``) uses that.
    ``None`` means no limit.
    """
    tool = tools.get(call.name)
    if tool is None:
        available = ", ".join(f'"{name}"' for name in tools) or "none"
        return error_result(
            call, ToolErrorKind.UNKNOWN_TOOL, f"no such tool; available tools: {available}"
        )
    timeout = _own_limit(tool, "timeout_s", timeout_s)
    limit = _own_limit(tool, "max_output_chars", max_output_chars)

    with anyio.move_on_after(timeout) as scope:
        try:
            result = await tool.run(call)
        except EnvironmentFailure:
            raise
        except ToolCallError as exc:
            return error_result(call, exc.kind, _truncate(exc.detail, limit)[0])
        except (Exception, SystemExit, asyncio.CancelledError) as exc:
            # argparse in a tool exits; a client library may raise CancelledError of its own.
            # Those are the tool's failures. A cancellation of this task is not: let it go.
            if isinstance(exc, asyncio.CancelledError) and _cancellation_requested():
                raise
            failure = _environment_failure_in(exc)
            if failure is not None:
                raise failure from exc
            logger.debug("tool %r raised", call.name, exc_info=True)
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return error_result(call, ToolErrorKind.TOOL_EXCEPTION, _truncate(detail, limit)[0])
    if scope.cancelled_caught:
        # A sync tool's thread cannot be stopped: it is abandoned and may still finish.
        outcome = (
            "was stopped"
            if getattr(tool, "is_async", True)
            else "could not be stopped, so it may still finish in the background"
        )
        return error_result(
            call, ToolErrorKind.TIMEOUT, f"timed out after {timeout:g} seconds and {outcome}"
        )
    if not isinstance(result, ToolResult):
        return error_result(
            call,
            ToolErrorKind.TOOL_EXCEPTION,
            f"the tool returned {type(result).__name__} instead of a ToolResult",
        )
    return _capped(addressed(result, call), limit)


def tool_message(call: ToolCall, content: str) -> Message:
    """The tool-role message that answers ``call``."""
    return Message(role="tool", content=content, tool_call_id=call.id, name=call.name)


def error_result(call: ToolCall, kind: ToolErrorKind, detail: str) -> ToolResult:
    """``Error calling tool "<name>": <detail>.`` as a tool message, with ``tool_error/<kind>``
    and ``metadata["error"]`` (such results are not subject to the output cap)."""
    detail = detail.rstrip()
    if not detail.endswith((".", "!", "?")):
        detail += "."
    name = call.name if len(call.name) <= 64 else call.name[:61] + "..."
    return ToolResult(
        messages=[tool_message(call, f'Error calling tool "{name}": {detail}')],
        metrics={f"tool_error/{kind}": 1.0},
        metadata={"error": str(kind)},
    )


def addressed(result: ToolResult, call: ToolCall) -> ToolResult:
    """Make every tool-role message of ``result`` name ``call`` (id and tool name), and make
    sure the call is answered by a tool-role message (an empty one goes first if there is
    none: chat templates and OpenAI-style histories pair every call with a tool message)."""
    if not any(message.role == "tool" for message in result.messages):
        result.messages = [tool_message(call, ""), *result.messages]
    result.messages = [
        message.model_copy(
            update={
                "tool_call_id": message.tool_call_id or call.id,
                "name": message.name or call.name,
            }
        )
        if message.role == "tool"
        else message
        for message in result.messages
    ]
    return result


def truncation_marker(removed: int) -> str:
    return f"\n[... {removed} characters truncated ...]\n"


def _truncate(text: str, limit: int | None) -> tuple[str, bool]:
    """Keep the head and the tail of ``text`` (both carry signal: a command's start, its final
    error), with a visible marker of what was cut in between."""
    if limit is None or len(text) <= limit:
        return text, False
    tail = limit // 2
    head = limit - tail
    return text[:head] + truncation_marker(len(text) - limit) + text[len(text) - tail :], True


def _capped(result: ToolResult, limit: int | None) -> ToolResult:
    if "error" in result.metadata:
        return result  # our own error text, short by construction
    truncated = False
    messages = []
    for message in result.messages:
        content, cut = _truncate(message.content, limit)
        truncated |= cut
        messages.append(message.model_copy(update={"content": content}) if cut else message)
    if truncated:
        result.messages = messages
        key = f"tool_error/{ToolErrorKind.OUTPUT_TRUNCATED}"
        result.metrics = {**result.metrics, key: result.metrics.get(key, 0.0) + 1.0}
    return result


def _own_limit[T](tool: Tool, attribute: str, default: T) -> T:
    own = getattr(tool, attribute, None)
    return default if own is None else own


def _cancellation_requested() -> bool:
    """Whether the running task is being cancelled (an anyio cancel scope around it, or
    ``Task.cancel()``, which is also how ``asyncio.run`` passes on Ctrl-C)."""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not on asyncio
        return False
    return task is not None and task.cancelling() > 0


def _environment_failure_in(exc: BaseException) -> EnvironmentFailure | None:
    """An EnvironmentFailure raised inside a tool's own task group arrives wrapped."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _environment_failure_in(inner)
            if found is not None:
                return found
    return exc if isinstance(exc, EnvironmentFailure) else None
