"""execute_tool_call: every way a call goes wrong becomes a message, except EnvironmentFailure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import sys
import threading
from typing import Any, ClassVar

import anyio
import pytest

from tool_use import (
    EnvironmentFailure,
    Message,
    ToolCall,
    ToolCallError,
    ToolErrorKind,
    ToolResult,
    ToolSpec,
    execute_tool_call,
    tool,
)
from tool_use.execution import truncation_marker

pytestmark = pytest.mark.anyio


def call(name: str, arguments: str = "{}") -> ToolCall:
    return ToolCall(id="c1", name=name, arguments=arguments)


@tool
async def echo(text: str) -> str:
    return text


@tool
def crash(message: str = "disk on fire") -> str:
    raise ValueError(message)


@tool
async def hang() -> str:
    await anyio.sleep(60)
    return "never"


@tool
def broken_sandbox() -> str:
    raise EnvironmentFailure("sandbox sbx-1 stopped answering", kind="sandbox")


TOOLS = {t.name: t for t in (echo, crash, hang, broken_sandbox)}


def error_text(result: ToolResult) -> str:
    [message] = result.messages
    assert message.role == "tool" and message.tool_call_id == "c1"
    return message.content


async def test_normal_call() -> None:
    result = await execute_tool_call(TOOLS, call("echo", '{"text": "hi"}'))
    assert result.messages == [Message(role="tool", content="hi", tool_call_id="c1", name="echo")]
    assert result.metrics == {}


async def test_unknown_tool_lists_the_available_ones() -> None:
    result = await execute_tool_call(TOOLS, call("rm"))
    assert error_text(result) == (
        'Error calling tool "rm": no such tool; available tools: "echo", "crash", "hang", '
        '"broken_sandbox".'
    )
    assert result.metrics == {"tool_error/unknown_tool": 1.0}


async def test_tool_exception_names_type_and_message_without_traceback() -> None:
    result = await execute_tool_call(TOOLS, call("crash"))
    assert error_text(result) == 'Error calling tool "crash": ValueError: disk on fire.'
    assert "Traceback" not in error_text(result)
    assert result.metrics == {"tool_error/tool_exception": 1.0}


async def test_exception_without_message_names_its_type() -> None:
    result = await execute_tool_call(TOOLS, call("crash", '{"message": ""}'))
    assert error_text(result) == 'Error calling tool "crash": ValueError.'


async def test_long_exception_messages_are_capped() -> None:
    result = await execute_tool_call(
        TOOLS, call("crash", '{"message": "' + "x" * 500 + '"}'), max_output_chars=100
    )
    assert truncation_marker(len("ValueError: ") + 500 - 100) in error_text(result)


async def test_timeout_cancels_an_async_tool_and_says_the_limit() -> None:
    with anyio.fail_after(5):
        result = await execute_tool_call(TOOLS, call("hang"), timeout_s=0.05)
    assert error_text(result) == (
        'Error calling tool "hang": timed out after 0.05 seconds and was stopped.'
    )
    assert result.metrics == {"tool_error/timeout": 1.0}


async def test_timeout_abandons_a_blocked_sync_tool() -> None:
    release = threading.Event()
    finished = threading.Event()

    @tool(timeout_s=0.05)
    def stuck() -> str:
        release.wait(timeout=10)
        finished.set()
        return "late"

    try:
        with anyio.fail_after(5):
            result = await execute_tool_call({"stuck": stuck}, call("stuck"), timeout_s=30)
        assert result.metrics == {"tool_error/timeout": 1.0}  # the tool's own 0.05 s won
        assert error_text(result) == (
            'Error calling tool "stuck": timed out after 0.05 seconds and could not be stopped, '
            "so it may still finish in the background."
        )
    finally:
        release.set()  # let the abandoned worker thread end
    assert finished.wait(timeout=5)


@tool
def cli(argv: list[str]) -> str:
    """A tool around an argparse CLI: a bad argument makes it exit."""
    parser = argparse.ArgumentParser(prog="proj")
    parser.add_argument("--count", type=int, required=True)
    with contextlib.redirect_stderr(io.StringIO()):
        return f"count={parser.parse_args(argv).count}"


@tool
async def quits() -> str:
    sys.exit("bye")


@tool
async def self_cancelling() -> str:
    """Its client library raises CancelledError on an internal timeout of its own."""
    raise asyncio.CancelledError()


@tool
def sync_self_cancelling() -> str:
    raise asyncio.CancelledError()


@pytest.mark.parametrize(
    ("tool_", "arguments", "text"),
    [
        (cli, '{"argv": ["--count", "three"]}', "SystemExit: 2"),
        (quits, "{}", "SystemExit: bye"),
        (self_cancelling, "{}", "CancelledError"),
        (sync_self_cancelling, "{}", "CancelledError"),
    ],
)
async def test_system_exit_and_a_tool_s_own_cancelled_error_are_tool_errors(
    tool_: Any, arguments: str, text: str
) -> None:
    result = await execute_tool_call({tool_.name: tool_}, call(tool_.name, arguments))
    assert error_text(result) == f'Error calling tool "{tool_.name}": {text}.'
    assert result.metrics == {"tool_error/tool_exception": 1.0}


async def test_cancelling_the_episode_still_cancels_it() -> None:
    """A cancel scope around the call (the trainer dropping a rollout) must not be turned into
    a tool message: the cancellation reaches the scope that asked for it."""
    outcome: list[ToolResult] = []
    with anyio.fail_after(5):
        with anyio.move_on_after(0.05) as scope:
            outcome.append(await execute_tool_call(TOOLS, call("hang"), timeout_s=30))
    assert scope.cancelled_caught
    assert outcome == []


async def test_cancelling_the_task_still_cancels_it() -> None:
    """``Task.cancel()``, which is also how ``asyncio.run`` passes on Ctrl-C."""
    started = asyncio.Event()

    @tool
    async def wait() -> str:
        started.set()
        await asyncio.sleep(60)
        return "never"

    task = asyncio.ensure_future(execute_tool_call({"wait": wait}, call("wait"), timeout_s=30))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_keyboard_interrupt_in_a_tool_is_not_caught() -> None:
    @tool
    async def interrupted() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await execute_tool_call({"interrupted": interrupted}, call("interrupted"))


async def test_tool_raising_timeout_error_itself_is_an_exception_not_a_timeout() -> None:
    @tool
    async def fetch() -> str:
        raise TimeoutError("upstream took too long")

    result = await execute_tool_call({"fetch": fetch}, call("fetch"), timeout_s=10)
    assert result.metrics == {"tool_error/tool_exception": 1.0}
    assert error_text(result) == 'Error calling tool "fetch": TimeoutError: upstream took too long.'


async def test_oversized_output_keeps_head_and_tail_with_a_marker() -> None:
    @tool
    def dump() -> str:
        return "H" * 100 + "M" * 1000 + "T" * 100

    result = await execute_tool_call({"dump": dump}, call("dump"), max_output_chars=200)
    [message] = result.messages
    assert message.content == "H" * 100 + truncation_marker(1000) + "T" * 100
    assert "[... 1000 characters truncated ...]" in message.content
    assert result.metrics == {"tool_error/output_truncated": 1.0}


async def test_tool_own_output_cap_beats_the_default() -> None:
    @tool(max_output_chars=10)
    def chatty() -> str:
        return "abcdefghijklmnopqrstuvwxyz"

    result = await execute_tool_call({"chatty": chatty}, call("chatty"), max_output_chars=None)
    assert result.messages[0].content == "abcde" + truncation_marker(16) + "vwxyz"


async def test_output_within_the_cap_is_untouched() -> None:
    result = await execute_tool_call(TOOLS, call("echo", '{"text": "short"}'), max_output_chars=5)
    assert result.messages[0].content == "short"
    assert result.metrics == {}


async def test_environment_failure_is_re_raised() -> None:
    with pytest.raises(EnvironmentFailure, match="sandbox sbx-1 stopped answering") as info:
        await execute_tool_call(TOOLS, call("broken_sandbox"))
    assert info.value.kind == "sandbox"


async def test_environment_failure_inside_a_task_group_is_unwrapped() -> None:
    @tool
    async def fan_out() -> str:
        async def fail() -> None:
            raise EnvironmentFailure("grader died", kind="grading")

        async with anyio.create_task_group() as group:
            group.start_soon(fail)
        return "unreachable"

    with pytest.raises(EnvironmentFailure, match="grader died"):
        await execute_tool_call({"fan_out": fan_out}, call("fan_out"))


class HandWritten:
    """A Tool written by hand, without @tool."""

    name = "lookup"
    spec: ClassVar[ToolSpec] = {
        "name": "lookup",
        "description": "",
        "parameters": {"type": "object"},
    }

    def __init__(self, outcome: object) -> None:
        self.outcome = outcome

    async def run(self, call: ToolCall) -> ToolResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome  # type: ignore[return-value]


async def test_hand_written_tool_raising_tool_call_error_gets_its_kind() -> None:
    tool_ = HandWritten(ToolCallError(ToolErrorKind.INVALID_ARGUMENTS, 'argument "key" is empty'))
    result = await execute_tool_call({"lookup": tool_}, call("lookup"))
    assert error_text(result) == 'Error calling tool "lookup": argument "key" is empty.'
    assert result.metrics == {"tool_error/invalid_arguments": 1.0}


async def test_hand_written_tool_returning_the_wrong_type_is_a_tool_exception() -> None:
    result = await execute_tool_call({"lookup": HandWritten("a string")}, call("lookup"))
    assert error_text(result) == (
        'Error calling tool "lookup": the tool returned str instead of a ToolResult.'
    )


async def test_hand_written_tool_messages_are_addressed_and_never_empty() -> None:
    bare = HandWritten(ToolResult(messages=[Message(role="tool", content="found")]))
    result = await execute_tool_call({"lookup": bare}, call("lookup"))
    assert result.messages == [
        Message(role="tool", content="found", tool_call_id="c1", name="lookup")
    ]
    silent = await execute_tool_call({"lookup": HandWritten(ToolResult([]))}, call("lookup"))
    assert silent.messages == [Message(role="tool", content="", tool_call_id="c1", name="lookup")]
    note = Message(role="user", content="Look again.")
    aside = await execute_tool_call({"lookup": HandWritten(ToolResult([note]))}, call("lookup"))
    assert aside.messages == [
        Message(role="tool", content="", tool_call_id="c1", name="lookup"),
        note,
    ]
