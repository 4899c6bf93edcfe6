"""The concepts of ``tool_use``, in one place.

Data flows like this::

    Tool (a @tool function, or any object with .spec and .run)
      -> ToolSpec        the OpenAI function spec the model is shown
      <- ToolCall        what the model asked for (raw JSON arguments, validated by the tool)
      -> ToolResult      tool-role messages + metrics, or a readable error

    MessageEnv (AgentToolMessageEnv)   history of Messages; one step per assistant message
      -> MessageStepResult            new env messages, done, reward, stop reason, metrics

    Renderer   Messages + ToolSpecs <-> token ids (tool_use.renderers)
    TokenEnv   wraps a MessageEnv with a renderer: Observation -> sampled tokens -> StepResult
    Trajectory one episode as token sequences with masks and logprobs (tool_use.trajectory)

``tool_use`` knows nothing about sandboxes, models or training.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]

ToolSpec = dict[str, Any]
"""An OpenAI function spec: ``{"name", "description", "parameters": <JSON schema>}``."""


class ToolCall(BaseModel):
    """A call the model made. ``arguments`` is the raw JSON text, exactly as sampled."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    arguments: str = "{}"

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class Message(BaseModel):
    """One chat message; ``to_openai()`` gives the dict chat templates expect."""

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    """Model "thinking" text, for templates that carry it separately (Qwen3)."""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        return out


class ToolErrorKind(StrEnum):
    """Why a tool call did not produce a normal result. Logged as ``tool_error/<kind>``."""

    INVALID_JSON = "invalid_json"
    """The arguments were not valid JSON (or not a JSON object)."""
    UNKNOWN_TOOL = "unknown_tool"
    """The model named a tool that does not exist."""
    INVALID_ARGUMENTS = "invalid_arguments"
    """Missing, extra or wrongly typed arguments."""
    TOOL_EXCEPTION = "tool_exception"
    """The tool itself raised."""
    TIMEOUT = "timeout"
    """The tool ran longer than its timeout: cancelled (async) or abandoned (a sync tool's
    thread cannot be stopped)."""
    OUTPUT_TRUNCATED = "output_truncated"
    """The result was longer than the cap and was cut, with a visible marker."""


@dataclass
class ToolResult:
    """What a tool returns to the episode loop."""

    messages: list[Message]
    should_stop: bool = False
    """Ask the episode to end after this call (e.g. a ``submit`` tool)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Merged into the episode's metrics (summed over calls)."""
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Tool(Protocol):
    """Anything the episode loop can call. ``@tool`` builds one from a typed function."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> ToolSpec: ...

    async def run(self, call: ToolCall) -> ToolResult:
        """Execute ``call``. Bad arguments should come back as an error ToolResult;
        anything raised is turned into one by the loop, except ``EnvironmentFailure``."""
        ...


class StopReason(StrEnum):
    """Why an episode ended. Logged one-hot as ``stop/<reason>``."""

    NO_TOOL_CALL = "no_tool_call"
    """The assistant answered without calling a tool: the normal end of an agent episode."""
    MAX_TURNS = "max_turns"
    """The episode used all ``max_turns`` assistant turns."""
    TOOL_STOP = "tool_stop"
    """A tool asked the episode to stop (``ToolResult.should_stop``)."""
    TOOL_BUDGET = "tool_budget"
    """The episode used all ``max_tool_calls`` tool calls."""
    PARSE_ERROR = "parse_error"
    """The assistant's output could not be parsed into a tool call (and no retries were left)."""
    MAX_TOKENS = "max_tokens"
    """A single turn hit ``max_tokens`` before its stop sequence."""
    CONTEXT_OVERFLOW = "context_overflow"
    """The episode would exceed ``max_trajectory_tokens``."""
    ENV_FAILURE = "env_failure"
    """Infrastructure broke (dead sandbox, grading error): the episode is invalid, not trained
    on."""


@dataclass
class ParsedResponse:
    """A renderer's reading of one sampled assistant turn."""

    message: Message
    """The assistant message (text and any well-formed tool calls)."""
    parse_error: str | None = None
    """Set when the output tried to call a tool but the call could not be parsed."""


@dataclass
class MessageStepResult:
    """The env's answer to one assistant message."""

    messages: list[Message]
    """New messages to append after the assistant message (tool results, corrections)."""
    done: bool
    reward: float = 0.0
    stop_reason: StopReason | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    """Set when the episode is invalid (infrastructure failure); it must not be trained on."""


RewardFn = Callable[[Sequence[Message]], Awaitable[float] | float]
"""Called once when an episode ends, with the full history; async or a plain function (which
runs on the event loop: keep it quick). Returns a finite real number. Raise
``EnvironmentFailure`` when the reward cannot be computed (the episode is then invalid, never
scored 0); anything else raised or returned is a bug (``RewardError``, ``tool_use.rewards``)."""


@runtime_checkable
class MessageEnv(Protocol):
    """A message-level environment: the model speaks, the env answers with messages.

    Optional: ``async finish(stop_reason, cut_message) -> MessageStepResult``, called by the
    token env when a token budget ends the episode (``MAX_TOKENS``, ``CONTEXT_OVERFLOW``) so
    the env can still grade it; envs without it get reward 0 then."""

    @property
    def tools(self) -> Sequence[ToolSpec]: ...

    async def initial_messages(self) -> list[Message]: ...

    async def step(self, response: ParsedResponse) -> MessageStepResult: ...

    async def close(self) -> None:
        """Release resources (sandboxes). Always called, also after errors."""
        ...


# ---- token level -------------------------------------------------------------------------

ToolChoice = Literal["auto", "required", "none"]


@dataclass
class Observation:
    """What the sampler continues from."""

    tokens: list[int]
    """Tokens to append to the current context (the whole prompt on the first turn)."""
    new_sequence: bool = False
    """True when the chat template rewrote history: ``tokens`` is a fresh full context and the
    previous one is closed as its own training sequence."""
    stop_sequences: list[list[int]] = field(default_factory=list)
    """Token sequences that end the turn (e.g. ``<|im_end|>``); they are kept in the sample."""
    max_tokens: int | None = None
    """Per-turn sampling budget; None: the trainer's ``max_tokens``. The trainer clips it to what
    ``max_trajectory_tokens`` leaves of the sequence (``MessageTokenEnv`` does so itself)."""
    tool_choice: ToolChoice = "auto"
    forced_prefix: list[int] = field(default_factory=list)
    """The renderer's tool-call envelope opening: forced before sampling freely with
    ``tool_choice="required"``, never completed with ``"none"``; empty with ``"auto"``."""


@dataclass
class StepResult:
    """The token env's answer to one sampled turn."""

    done: bool
    next_observation: Observation | None
    reward: float = 0.0
    stop_reason: StopReason | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    message: Message | None = None
    """The parsed assistant message of this turn (for logs and the rollout viewer)."""
    env_messages: list[Message] = field(default_factory=list)
    """The env messages appended after it."""


@runtime_checkable
class TokenEnv(Protocol):
    """A token-level environment. ``tool_use.token_env.MessageTokenEnv`` adapts any MessageEnv.

    Written by hand, it owns what the adapter does for message envs: rendering, stop sequences,
    ``tool_choice`` and forced prefixes, parsing, stop reasons and the reward (a finite
    number). The trainer only fills in ``Observation.max_tokens`` and caps each sequence at
    ``max_trajectory_tokens``. Optional, like on message envs: ``teacher_messages`` and a
    ``metadata`` dict."""

    async def initial_observation(self) -> Observation: ...

    async def step(self, sampled: Sequence[int]) -> StepResult: ...

    async def close(self) -> None: ...
