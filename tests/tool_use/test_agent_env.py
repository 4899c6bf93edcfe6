"""Full episodes of AgentToolMessageEnv, driven by scripted assistant messages (no model),
calling real async and sync tools."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import anyio
import pytest

from tool_use import (
    AgentToolMessageEnv,
    EnvironmentFailure,
    Message,
    MessageEnv,
    MessageStepResult,
    ParsedResponse,
    StopReason,
    ToolCall,
    ToolResult,
    tool,
    zero_reward,
)

pytestmark = pytest.mark.anyio

PROMPT = [
    Message(role="system", content="You are a careful agent."),
    Message(role="user", content="Remember that the answer is 42, then tell me."),
]


def tc(id: str, name: str, **arguments: object) -> ToolCall:
    return ToolCall(id=id, name=name, arguments=json.dumps(arguments))


def say(content: str = "", *calls: ToolCall, parse_error: str | None = None) -> ParsedResponse:
    message = Message(role="assistant", content=content, tool_calls=list(calls))
    return ParsedResponse(message=message, parse_error=parse_error)


async def play(env: AgentToolMessageEnv, script: Sequence[ParsedResponse]) -> MessageStepResult:
    """Feed the script until the episode ends; the script must end it exactly."""
    await env.initial_messages()
    for index, response in enumerate(script):
        result = await env.step(response)
        if result.done:
            assert index == len(script) - 1, "the episode ended before the script did"
            return result
        assert result.metrics == {}, "episode metrics arrive with the final step only"
    raise AssertionError("the script ended before the episode did")


class Memory:
    """Per-episode state with an async and a sync tool."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    @tool
    async def remember(self, key: str, value: str) -> ToolResult:
        """Store a value."""
        self.notes[key] = value
        return ToolResult(
            messages=[Message(role="tool", content=f"stored {key}")],
            metrics={"memory/bytes": float(len(value))},
        )

    @tool
    def recall(self, key: str) -> str:
        """Read a value back (sync: runs in a worker thread)."""
        return self.notes.get(key, "nothing stored")


@tool
async def submit(answer: str) -> ToolResult:
    """Hand in the final answer."""
    return ToolResult(messages=[Message(role="tool", content="received")], should_stop=True)


@tool
def ping() -> str:
    return "pong"


class RecordingReward:
    def __init__(self, value: float = 1.0) -> None:
        self.calls: list[list[Message]] = []
        self.value = value

    async def __call__(self, messages: Sequence[Message]) -> float:
        self.calls.append(list(messages))
        return self.value


# ---- a whole episode ----------------------------------------------------------------------


async def test_full_episode_history_reward_and_metrics() -> None:
    memory = Memory()
    reward = RecordingReward(0.75)
    env = AgentToolMessageEnv(
        initial_messages=PROMPT,
        tools=[memory.remember, memory.recall],
        reward_fn=reward,
        max_turns=5,
    )
    assert isinstance(env, MessageEnv)
    assert [spec["name"] for spec in env.tools] == ["remember", "recall"]
    assert await env.initial_messages() == PROMPT

    first = await env.step(
        say(
            "Saving it.",
            tc("a", "remember", key="answer", value="42"),
            tc("b", "recall", key="answer"),
        )
    )
    assert not first.done
    assert first.messages == [
        Message(role="tool", content="stored answer", tool_call_id="a", name="remember"),
        Message(role="tool", content="42", tool_call_id="b", name="recall"),
    ]
    final = await env.step(say("The answer is 42."))

    assert final.done
    assert final.stop_reason is StopReason.NO_TOOL_CALL
    assert final.reward == 0.75
    assert final.failure is None
    assert final.messages == []
    assert final.metrics == {
        "turns": 2.0,
        "tool_calls": 2.0,
        "parse_errors": 0.0,
        "memory/bytes": 2.0,
        "stop/no_tool_call": 1.0,
    }
    assert env.messages == [
        *PROMPT,
        Message(
            role="assistant",
            content="Saving it.",
            tool_calls=[
                tc("a", "remember", key="answer", value="42"),
                tc("b", "recall", key="answer"),
            ],
        ),
        *first.messages,
        Message(role="assistant", content="The answer is 42."),
    ]
    assert reward.calls == [env.messages]  # once, with the full history
    with pytest.raises(RuntimeError, match="after the episode ended"):
        await env.step(say("more"))


async def test_zero_reward_for_distillation() -> None:
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[ping])
    assert env.reward_fn is zero_reward
    final = await play(env, [say("", tc("1", "ping")), say("done")])
    assert final.reward == 0.0
    assert final.failure is None


# ---- stop reasons -------------------------------------------------------------------------


async def test_max_turns() -> None:
    reward = RecordingReward()
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[ping], max_turns=3, reward_fn=reward)
    final = await play(env, [say("", tc(str(i), "ping")) for i in range(3)])
    assert final.stop_reason is StopReason.MAX_TURNS
    assert final.metrics["stop/max_turns"] == 1.0
    assert final.metrics["turns"] == 3.0
    assert final.messages == [Message(role="tool", content="pong", tool_call_id="2", name="ping")]
    assert len(reward.calls) == 1


async def test_tool_asks_to_stop_after_the_whole_message_ran() -> None:
    memory = Memory()
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[submit, memory.remember])
    final = await play(
        env,
        [say("", tc("s", "submit", answer="42"), tc("r", "remember", key="k", value="v"))],
    )
    assert final.stop_reason is StopReason.TOOL_STOP
    assert [m.content for m in final.messages] == ["received", "stored k"]
    assert memory.notes == {"k": "v"}
    assert final.metrics["stop/tool_stop"] == 1.0


async def test_tool_budget_answers_the_calls_it_cannot_run() -> None:
    memory = Memory()
    env = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[memory.remember], max_tool_calls=3, max_turns=10
    )
    final = await play(
        env,
        [
            say(
                "", tc("1", "remember", key="a", value="1"), tc("2", "remember", key="b", value="2")
            ),
            say(
                "", tc("3", "remember", key="c", value="3"), tc("4", "remember", key="d", value="4")
            ),
        ],
    )
    assert final.stop_reason is StopReason.TOOL_BUDGET
    assert memory.notes == {"a": "1", "b": "2", "c": "3"}
    assert final.messages == [
        Message(role="tool", content="stored c", tool_call_id="3", name="remember"),
        Message(
            role="tool",
            content="Not run: the episode's budget of 3 tool calls is used up.",
            tool_call_id="4",
            name="remember",
        ),
    ]
    assert final.metrics["tool_calls"] == 3.0
    assert final.metrics["stop/tool_budget"] == 1.0


# ---- tool errors are data -----------------------------------------------------------------


async def test_bad_calls_become_messages_and_metrics_and_the_episode_goes_on() -> None:
    memory = Memory()

    @tool(timeout_s=0.05)
    async def slow() -> str:
        await anyio.sleep(30)
        return "never"

    @tool
    def explode() -> str:
        raise RuntimeError("boom")

    env = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[memory.remember, slow, explode], max_output_chars=50
    )
    first = await env.step(
        say(
            "",
            tc("1", "remember", key="k"),
            tc("2", "delete_everything"),
            ToolCall(id="3", name="remember", arguments="{not json"),
            tc("4", "slow"),
            tc("5", "explode"),
            tc("6", "remember", key="k", value="x" * 200),
        )
    )
    assert not first.done
    contents = [m.content for m in first.messages]
    assert contents[:5] == [
        'Error calling tool "remember": argument "value" is required (string).',
        'Error calling tool "delete_everything": no such tool; available tools: "remember", '
        '"slow", "explode".',
        'Error calling tool "remember": arguments are not valid JSON (Expecting property name '
        "enclosed in double quotes at line 1 column 2); send a JSON object.",
        'Error calling tool "slow": timed out after 0.05 seconds and was stopped.',
        'Error calling tool "explode": RuntimeError: boom.',
    ]
    assert contents[5] == "stored k"
    assert [m.tool_call_id for m in first.messages] == ["1", "2", "3", "4", "5", "6"]

    final = await env.step(say("", tc("7", "nope")))
    assert not final.done
    final = await env.step(say("I give up."))
    assert final.metrics == {
        "turns": 3.0,
        "tool_calls": 7.0,
        "parse_errors": 0.0,
        "tool_error/invalid_arguments": 1.0,
        "tool_error/unknown_tool": 2.0,
        "tool_error/invalid_json": 1.0,
        "tool_error/timeout": 1.0,
        "tool_error/tool_exception": 1.0,
        "memory/bytes": 200.0,
        "stop/no_tool_call": 1.0,
    }


async def test_oversized_tool_output_is_truncated_in_the_history() -> None:
    @tool
    def cat() -> str:
        return "a" * 30 + "b" * 30

    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[cat], max_output_chars=20)
    result = await env.step(say("", tc("1", "cat")))
    assert result.messages[0].content == "a" * 10 + "\n[... 40 characters truncated ...]\n" + (
        "b" * 10
    )
    final = await env.step(say("ok"))
    assert final.metrics["tool_error/output_truncated"] == 1.0


# ---- parallel and sequential execution ----------------------------------------------------


async def test_parallel_calls_overlap_and_results_keep_call_order() -> None:
    """`first` can only finish after `second` has: sequential execution would deadlock (and
    hit the tool timeout); parallel execution finishes, and still lists `first` first."""
    second_done = anyio.Event()
    finished: list[str] = []

    @tool(timeout_s=5)
    async def first() -> str:
        await second_done.wait()
        finished.append("first")
        return "first result"

    @tool(timeout_s=5)
    async def second() -> str:
        finished.append("second")
        second_done.set()
        return "second result"

    env = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[first, second], parallel_tool_calls=True
    )
    with anyio.fail_after(5):
        result = await env.step(say("", tc("1", "first"), tc("2", "second")))
    assert finished == ["second", "first"]
    assert [m.content for m in result.messages] == ["first result", "second result"]
    assert [m.tool_call_id for m in result.messages] == ["1", "2"]


async def test_parallel_sync_tools_run_in_threads_at_the_same_time() -> None:
    barrier = threading.Barrier(2, timeout=5)  # both threads must be inside at once

    @tool
    def meet(who: str) -> str:
        barrier.wait()
        return f"{who} met"

    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[meet], parallel_tool_calls=True)
    result = await env.step(say("", tc("1", "meet", who="a"), tc("2", "meet", who="b")))
    assert [m.content for m in result.messages] == ["a met", "b met"]


async def test_sequential_calls_run_one_after_another_in_order() -> None:
    events: list[str] = []

    @tool
    async def step_(label: str) -> str:
        events.append(f"start {label}")
        await anyio.sleep(0.01)
        events.append(f"end {label}")
        return label

    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[tool(name="work")(step_.fn)])
    result = await env.step(say("", tc("1", "work", label="a"), tc("2", "work", label="b")))
    assert events == ["start a", "end a", "start b", "end b"]
    assert [m.content for m in result.messages] == ["a", "b"]


# ---- parse errors -------------------------------------------------------------------------


async def test_parse_error_ends_the_episode_by_default() -> None:
    reward = RecordingReward(0.0)
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[ping], reward_fn=reward)
    final = await play(env, [say("<tool_call>{oops", parse_error="invalid JSON in tool call")])
    assert final.stop_reason is StopReason.PARSE_ERROR
    assert final.messages == []
    assert final.metrics["parse_errors"] == 1.0
    assert final.metrics["stop/parse_error"] == 1.0
    assert len(reward.calls) == 1  # a model mistake is a real outcome, scored as usual


async def test_parse_error_retry_sends_a_correction_then_gives_up() -> None:
    env = AgentToolMessageEnv(
        initial_messages=PROMPT,
        tools=[ping],
        parse_error_policy="retry",
        max_parse_retries=2,
    )
    bad = say("<tool_call>{oops", parse_error="invalid JSON in tool call.")
    first = await env.step(bad)
    assert not first.done
    assert first.messages == [
        Message(
            role="user",
            content="Your last message could not be read as a tool call: invalid JSON in tool "
            "call. Send the tool call again in the correct format.",
        )
    ]
    assert not (await env.step(bad)).done
    final = await env.step(bad)
    assert final.stop_reason is StopReason.PARSE_ERROR
    assert final.metrics["parse_errors"] == 3.0
    assert final.metrics["turns"] == 3.0


async def test_parse_error_retry_recovers() -> None:
    env = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[ping], parse_error_policy="retry", max_parse_retries=1
    )
    final = await play(
        env,
        [say("<tool_call>{", parse_error="unterminated"), say("", tc("1", "ping")), say("done")],
    )
    assert final.stop_reason is StopReason.NO_TOOL_CALL
    assert [m.role for m in env.messages] == [
        "system",
        "user",
        "assistant",
        "user",  # the correction
        "assistant",
        "tool",
        "assistant",
    ]
    assert final.metrics["parse_errors"] == 1.0


async def test_parse_error_retry_respects_max_turns() -> None:
    env = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[ping], parse_error_policy="retry", max_turns=1
    )
    final = await play(env, [say("{", parse_error="bad")])
    assert final.stop_reason is StopReason.PARSE_ERROR


# ---- infrastructure failures --------------------------------------------------------------


@tool
def dead_sandbox() -> str:
    raise EnvironmentFailure("container abc exited (137)", kind="sandbox")


@pytest.mark.parametrize("parallel", [False, True])
async def test_environment_failure_in_a_tool_invalidates_the_episode(parallel: bool) -> None:
    cancelled = anyio.Event()

    @tool
    async def long_running() -> str:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()
        return "never"

    reward = RecordingReward()
    env = AgentToolMessageEnv(
        initial_messages=PROMPT,
        tools=[ping, dead_sandbox, long_running],
        reward_fn=reward,
        parallel_tool_calls=parallel,
    )
    await env.step(say("", tc("1", "ping")))
    calls = [tc("2", "long_running"), tc("3", "dead_sandbox")] if parallel else []
    with anyio.fail_after(5):
        final = await env.step(say("", *calls, tc("4", "dead_sandbox")))
    assert final.done
    assert final.stop_reason is StopReason.ENV_FAILURE
    assert final.failure == "sandbox: container abc exited (137)"
    assert final.metrics["failure/sandbox"] == 1.0
    assert final.metrics["stop/env_failure"] == 1.0
    assert reward.calls == []  # never scored
    if parallel:
        assert cancelled.is_set()  # the sibling call was cancelled, not left running


async def test_environment_failure_in_reward_fn_invalidates_the_episode() -> None:
    async def grader(messages: Sequence[Message]) -> float:
        raise EnvironmentFailure("tests/test.sh wrote no reward file", kind="grading")

    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[ping], reward_fn=grader)
    final = await play(env, [say("done")])
    assert final.stop_reason is StopReason.ENV_FAILURE
    assert final.failure == "grading: tests/test.sh wrote no reward file"
    assert final.metrics["failure/grading"] == 1.0
    assert "stop/no_tool_call" not in final.metrics


# ---- lifetime and attributes --------------------------------------------------------------


class Closer:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


async def test_on_close_runs_once_after_a_normal_episode() -> None:
    closer = Closer()
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[ping], on_close=closer)
    await play(env, [say("done")])
    await env.close()
    await env.close()
    assert closer.count == 1


async def test_on_close_runs_after_a_failed_or_abandoned_episode() -> None:
    failed_closer, abandoned_closer = Closer(), Closer()
    failed = AgentToolMessageEnv(
        initial_messages=PROMPT, tools=[dead_sandbox], on_close=failed_closer
    )
    assert (await failed.step(say("", tc("1", "dead_sandbox")))).failure
    await failed.close()
    abandoned = AgentToolMessageEnv(initial_messages=PROMPT, on_close=abandoned_closer)
    await abandoned.close()
    assert (failed_closer.count, abandoned_closer.count) == (1, 1)


async def test_optional_attributes_for_the_trainer() -> None:
    teacher = [Message(role="user", content="Hint: the answer is 42.")]
    env = AgentToolMessageEnv(
        initial_messages=PROMPT, teacher_messages=teacher, metadata={"task": "hello"}
    )
    assert env.teacher_messages == teacher
    assert env.metadata == {"task": "hello"}
    plain = AgentToolMessageEnv(initial_messages=PROMPT)
    assert plain.teacher_messages is None
    assert plain.metadata == {}


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_turns": 0}, "max_turns must be >= 1, got 0"),
        ({"max_tool_calls": 0}, "max_tool_calls must be >= 1 or None, got 0"),
        ({"max_parse_retries": -1}, "max_parse_retries must be >= 0, got -1"),
        ({"tools": [ping, tool(name="ping")(lambda: "x")]}, "two tools are named 'ping'"),
        ({"parse_error_policy": "ignore"}, "'ignore' is not a valid ParseErrorPolicy"),
    ],
)
def test_bad_configuration_is_refused(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        AgentToolMessageEnv(initial_messages=PROMPT, **kwargs)


def test_a_method_tool_taken_from_the_class_is_refused_when_the_env_is_built() -> None:
    with pytest.raises(TypeError, match=r"tool 'recall' is a method; use it through an instance"):
        AgentToolMessageEnv(initial_messages=PROMPT, tools=[Memory.recall])
    AgentToolMessageEnv(initial_messages=PROMPT, tools=[Memory().recall])
