"""The message-level episode loop: the model speaks, tools answer, until a stop reason.

``AgentToolMessageEnv`` keeps the history, runs the tool calls of each assistant message
(through ``execute_tool_call``, so the model's mistakes become messages it can read), decides
when the episode ends, and asks ``reward_fn`` for the reward once at the end. It knows nothing
about tokens, models or sandboxes: a token-level wrapper (``tool_use.token_env``) renders it,
and resources such as sandboxes belong to whoever built the env (released via ``on_close``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import anyio

from tool_use.errors import EnvironmentFailure
from tool_use.execution import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TIMEOUT_S,
    execute_tool_call,
    tool_message,
)
from tool_use.rewards import call_reward_fn
from tool_use.tool import FunctionTool
from tool_use.types import (
    Message,
    MessageStepResult,
    ParsedResponse,
    RewardFn,
    StopReason,
    Tool,
    ToolCall,
    ToolResult,
    ToolSpec,
)


async def zero_reward(messages: Sequence[Message]) -> float:
    """The reward of distillation episodes: the teacher's per-token scores are the signal."""
    return 0.0


class ParseErrorPolicy(StrEnum):
    """What happens when the assistant's output tried to call a tool but could not be parsed."""

    END = "end"
    """End the episode with ``StopReason.PARSE_ERROR``."""
    RETRY = "retry"
    """Append a user message naming the error and let the model try again (up to
    ``max_parse_retries`` times in an episode), then end as with ``END``."""


class AgentToolMessageEnv:
    """One tool-use episode at the message level (implements ``MessageEnv``).

    One ``step`` per assistant message. All tool calls of a message run (in parallel when
    ``parallel_tool_calls``; their results are appended in call order either way); the episode
    ends when the assistant calls no tool, a tool asks to stop, ``max_tool_calls`` is used up,
    ``max_turns`` assistant messages were sent, or the output could not be parsed (policy).

    Metrics of the whole episode come with the final step result: ``turns``, ``tool_calls``,
    ``parse_errors``, ``tool_error/<kind>``, every tool's own metrics (summed),
    ``stop/<reason>`` and, for invalid episodes, ``failure/<kind>``.
    """

    def __init__(
        self,
        *,
        initial_messages: Sequence[Message],
        tools: Sequence[Tool] = (),
        reward_fn: RewardFn = zero_reward,
        max_turns: int = 10,
        max_tool_calls: int | None = None,
        parallel_tool_calls: bool = False,
        parse_error_policy: ParseErrorPolicy | str = ParseErrorPolicy.END,
        max_parse_retries: int = 2,
        tool_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_output_chars: int | None = DEFAULT_MAX_OUTPUT_CHARS,
        teacher_messages: Sequence[Message] | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"AgentToolMessageEnv: max_turns must be >= 1, got {max_turns}")
        if max_tool_calls is not None and max_tool_calls < 1:
            raise ValueError(
                f"AgentToolMessageEnv: max_tool_calls must be >= 1 or None, got {max_tool_calls}"
            )
        if max_parse_retries < 0:
            raise ValueError(
                f"AgentToolMessageEnv: max_parse_retries must be >= 0, got {max_parse_retries}"
            )
        for t in tools:
            if isinstance(t, FunctionTool):
                try:
                    t.check_callable()
                except TypeError as exc:
                    raise TypeError(f"AgentToolMessageEnv: {exc}") from None
        names = Counter(t.name for t in tools)
        duplicates = sorted(name for name, count in names.items() if count > 1)
        if duplicates:
            raise ValueError(f"AgentToolMessageEnv: two tools are named {duplicates[0]!r}")
        self.tools_by_name: dict[str, Tool] = {t.name: t for t in tools}
        self.messages: list[Message] = list(initial_messages)
        """The full history so far (initial messages, assistant messages, env answers)."""
        self.reward_fn = reward_fn
        self.max_turns = max_turns
        self.max_tool_calls = max_tool_calls
        self.parallel_tool_calls = parallel_tool_calls
        self.parse_error_policy = ParseErrorPolicy(parse_error_policy)
        self.max_parse_retries = max_parse_retries
        self.tool_timeout_s = tool_timeout_s
        self.max_output_chars = max_output_chars
        self.teacher_messages = list(teacher_messages) if teacher_messages is not None else None
        self.metadata = dict(metadata or {})
        self.on_close = on_close
        self.done = False
        self.turns = 0
        self.tool_calls = 0
        self.parse_errors = 0
        self._tool_metrics: Counter[str] = Counter()
        self._closed = False

    @property
    def tools(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools_by_name.values()]

    @property
    def metrics(self) -> dict[str, float]:
        """The episode's metrics so far (stop and failure keys are added at the end)."""
        return {
            "turns": float(self.turns),
            "tool_calls": float(self.tool_calls),
            "parse_errors": float(self.parse_errors),
            **self._tool_metrics,
        }

    async def initial_messages(self) -> list[Message]:
        return list(self.messages)

    async def step(self, response: ParsedResponse) -> MessageStepResult:
        if self.done:
            raise RuntimeError("AgentToolMessageEnv.step() called after the episode ended")
        message = response.message
        if message.role != "assistant":
            raise ValueError(f"step() expects an assistant message, got role {message.role!r}")
        self.messages.append(message)
        self.turns += 1

        if response.parse_error is not None:
            self.parse_errors += 1
            retries_left = self.parse_errors <= self.max_parse_retries
            if (
                self.parse_error_policy is ParseErrorPolicy.RETRY
                and retries_left
                and self.turns < self.max_turns
            ):
                return self._continue([correction_message(response.parse_error)])
            return await self._finish([], StopReason.PARSE_ERROR)

        calls = message.tool_calls
        if not calls:
            return await self._finish([], StopReason.NO_TOOL_CALL)

        budget = len(calls)
        if self.max_tool_calls is not None:
            budget = min(budget, self.max_tool_calls - self.tool_calls)
        try:
            results = await self._run(calls[:budget])
        except EnvironmentFailure as failure:
            return self._fail(failure)
        answers = [m for result in results for m in result.messages]
        answers += [skipped_message(call, self.max_tool_calls) for call in calls[budget:]]
        self.tool_calls += budget
        for result in results:
            self._tool_metrics.update(result.metrics)

        if any(result.should_stop for result in results):
            return await self._finish(answers, StopReason.TOOL_STOP)
        if self.max_tool_calls is not None and self.tool_calls >= self.max_tool_calls:
            return await self._finish(answers, StopReason.TOOL_BUDGET)
        if self.turns >= self.max_turns:
            return await self._finish(answers, StopReason.MAX_TURNS)
        return self._continue(answers)

    async def finish(
        self, stop_reason: StopReason, cut_message: Message | None = None
    ) -> MessageStepResult:
        """End the episode from outside (a token budget ran out) and compute its reward as if
        it had ended here: ``reward_fn`` runs on the history, plus ``cut_message`` (the
        assistant turn that was cut off mid-way, never run) when given."""
        if self.done:
            raise RuntimeError("AgentToolMessageEnv.finish() called after the episode ended")
        if cut_message is not None:
            self.messages.append(cut_message)
            self.turns += 1
        return await self._finish([], stop_reason)

    async def close(self) -> None:
        """Run ``on_close`` once (later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            await self.on_close()

    # ---- internals ------------------------------------------------------------------------

    async def _run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
        if not self.parallel_tool_calls or len(calls) == 1:
            return [await self._execute(call) for call in calls]
        results: list[ToolResult | None] = [None] * len(calls)
        failures: list[EnvironmentFailure] = []

        async def run_one(index: int, call: ToolCall) -> None:
            try:
                results[index] = await self._execute(call)
            except EnvironmentFailure as failure:
                failures.append(failure)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for index, call in enumerate(calls):
                group.start_soon(run_one, index, call)
        if failures:
            raise failures[0]
        return [result for result in results if result is not None]

    async def _execute(self, call: ToolCall) -> ToolResult:
        return await execute_tool_call(
            self.tools_by_name,
            call,
            timeout_s=self.tool_timeout_s,
            max_output_chars=self.max_output_chars,
        )

    def _continue(self, answers: list[Message]) -> MessageStepResult:
        self.messages.extend(answers)
        return MessageStepResult(messages=answers, done=False)

    async def _finish(self, answers: list[Message], reason: StopReason) -> MessageStepResult:
        self.messages.extend(answers)
        self.done = True
        try:
            reward = await call_reward_fn(
                self.reward_fn, list(self.messages), env=type(self).__name__
            )
        except EnvironmentFailure as failure:
            return self._fail(failure, answers)
        return MessageStepResult(
            messages=answers,
            done=True,
            reward=reward,
            stop_reason=reason,
            metrics={**self.metrics, f"stop/{reason}": 1.0},
        )

    def _fail(
        self, failure: EnvironmentFailure, answers: list[Message] | None = None
    ) -> MessageStepResult:
        """An invalid episode: no reward is computed (or kept), and ``failure`` says why."""
        self.done = True
        return MessageStepResult(
            messages=answers or [],
            done=True,
            stop_reason=StopReason.ENV_FAILURE,
            metrics={
                **self.metrics,
                f"stop/{StopReason.ENV_FAILURE}": 1.0,
                f"failure/{failure.kind}": 1.0,
            },
            failure=f"{failure.kind}: {failure}",
        )


def correction_message(parse_error: str) -> Message:
    """The user message that asks the model to repair an unparseable tool call."""
    return Message(
        role="user",
        content=(
            f"Your last message could not be read as a tool call: {parse_error.rstrip('. ')}. "
            "Send the tool call again in the correct format."
        ),
    )


def skipped_message(call: ToolCall, max_tool_calls: int | None) -> Message:
    """Answers a call beyond the budget, so every call in the history has an answer."""
    return tool_message(
        call, f"Not run: the episode's budget of {max_tool_calls} tool calls is used up."
    )
