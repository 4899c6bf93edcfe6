"""Message envs at the token level, and the loop that turns one episode into a Trajectory.

``MessageTokenEnv`` wraps any ``MessageEnv`` with a renderer. The first observation is the
rendered prompt; after each sampled turn it parses the tokens, lets the message env answer, and
observes only the new tokens (env messages + the next assistant header): the history is never
re-tokenised. When the renderer says the template rewrote history (Qwen3 dropping old thinking),
the observation is a full re-render with ``new_sequence=True``. When a token budget ends the
episode (``MAX_TOKENS``, ``CONTEXT_OVERFLOW``), a message env that has the optional
``finish(stop_reason, cut_message)`` method is asked for the outcome (its reward, metrics, or
failure): Harbor grades the sandbox however the agent stopped.

``run_episode`` drives one episode with any sampler callable and records the ``Trajectory``:
mask 1 exactly on tokens the student sampled; prompt, env and forced-prefix tokens get 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio

from tool_use.errors import EnvironmentFailure, ToolUseError
from tool_use.renderers.base import Renderer
from tool_use.trajectory import TokenSequence, Trajectory, Turn
from tool_use.types import (
    Message,
    MessageEnv,
    MessageStepResult,
    Observation,
    StepResult,
    StopReason,
    TokenEnv,
    ToolChoice,
)


class PromptTooLongError(ToolUseError, ValueError):
    """The initial prompt leaves no room to sample within ``max_trajectory_tokens``."""


class MessageTokenEnv:
    """A ``MessageEnv`` as a ``TokenEnv`` (implements ``TokenEnv``).

    Budgets: ``max_tokens`` caps each turn (the forced prefix included); ``max_trajectory_tokens``
    caps the length of the current sequence (the context the model sees). Each turn's budget is
    clipped to what the sequence has left; a turn that needs more ends the episode with
    ``CONTEXT_OVERFLOW``, a turn that hits ``max_tokens`` itself ends it with ``MAX_TOKENS``.
    """

    def __init__(
        self,
        message_env: MessageEnv,
        renderer: Renderer,
        *,
        max_tokens: int = 512,
        max_trajectory_tokens: int | None = None,
        tool_choice: ToolChoice = "auto",
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"MessageTokenEnv: max_tokens must be >= 1, got {max_tokens}")
        if max_trajectory_tokens is not None and max_trajectory_tokens < 2:
            raise ValueError(
                "MessageTokenEnv: max_trajectory_tokens must be >= 2 or None, "
                f"got {max_trajectory_tokens}"
            )
        if tool_choice not in ("auto", "required", "none"):
            raise ValueError(
                f"MessageTokenEnv: tool_choice must be auto, required or none, got {tool_choice!r}"
            )
        self.message_env = message_env
        self.renderer = renderer
        self.max_tokens = max_tokens
        self.max_trajectory_tokens = max_trajectory_tokens
        self.tool_choice: ToolChoice = tool_choice
        self.forced_prefix = renderer.tool_call_prefix if tool_choice != "auto" else []
        self.messages: list[Message] = []
        """The student-side history: initial messages, parsed assistant turns, env answers."""
        self.tools: list[dict[str, Any]] = []
        self.context_length = 0
        """Tokens in the current sequence so far."""
        self._turn_budget = max_tokens

    @property
    def teacher_messages(self) -> list[Message] | None:
        found = getattr(self.message_env, "teacher_messages", None)
        return list(found) if found is not None else None

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(getattr(self.message_env, "metadata", None) or {})

    async def initial_observation(self) -> Observation:
        self.messages = list(await self.message_env.initial_messages())
        self.tools = list(self.message_env.tools)
        tokens = self.renderer.render_prompt(self.messages, self.tools)
        self.context_length = 0
        observation = self._observe(tokens, new_sequence=False)
        if observation is None:
            raise PromptTooLongError(
                f"the initial prompt is {len(tokens)} tokens, which leaves no room to sample "
                f"within max_trajectory_tokens={self.max_trajectory_tokens}"
            )
        return observation

    async def step(self, sampled: Sequence[int]) -> StepResult:
        sampled = list(sampled)
        self.context_length += len(sampled)
        parsed = self.renderer.parse(sampled)
        message = parsed.message
        _, stopped = self.renderer.strip_stop(sampled)
        if not stopped:
            # Cut off mid-turn: the text is incomplete, so it is neither run nor answered.
            self.messages.append(message)
            clipped = self._turn_budget < self.max_tokens
            reason = StopReason.CONTEXT_OVERFLOW if clipped else StopReason.MAX_TOKENS
            return await self._cut_off(reason, message, cut_message=message)

        result = await self.message_env.step(parsed)
        history = [*self.messages, message]
        self.messages = [*history, *result.messages]
        if result.done:
            return StepResult(
                done=True,
                next_observation=None,
                reward=result.reward,
                stop_reason=result.stop_reason,
                metrics=dict(result.metrics),
                failure=result.failure,
                message=message,
                env_messages=list(result.messages),
            )
        if self.renderer.rewrites_history(history, result.messages, self.tools):
            tokens = self.renderer.render_prompt(self.messages, self.tools)
            observation = self._observe(tokens, new_sequence=True)
        else:
            tokens = self.renderer.render_continuation(history, result.messages, self.tools)
            observation = self._observe(tokens, new_sequence=False)
        if observation is None:
            return await self._cut_off(
                StopReason.CONTEXT_OVERFLOW, message, env_messages=list(result.messages)
            )
        return StepResult(
            done=False,
            next_observation=observation,
            metrics=dict(result.metrics),
            message=message,
            env_messages=list(result.messages),
        )

    async def close(self) -> None:
        await self.message_env.close()

    async def _cut_off(
        self,
        reason: StopReason,
        message: Message,
        *,
        cut_message: Message | None = None,
        env_messages: list[Message] | None = None,
    ) -> StepResult:
        """End the episode on a token budget. A message env with a ``finish`` method is asked
        for the episode's outcome (a Harbor task is graded however the agent stopped); without
        one the reward is 0."""
        finish = getattr(self.message_env, "finish", None)
        if finish is None:
            return _end(reason, message, env_messages)
        result: MessageStepResult = await finish(reason, cut_message)
        stop_reason = result.stop_reason or reason
        return StepResult(
            done=True,
            next_observation=None,
            reward=result.reward,
            stop_reason=stop_reason,
            metrics={f"stop/{stop_reason}": 1.0, **result.metrics},
            failure=result.failure,
            message=message,
            env_messages=env_messages or [],
        )

    def _observe(self, tokens: list[int], *, new_sequence: bool) -> Observation | None:
        """The observation for ``tokens``, or None when no turn fits after them."""
        context = (0 if new_sequence else self.context_length) + len(tokens)
        budget = self.max_tokens
        if self.max_trajectory_tokens is not None:
            budget = min(budget, self.max_trajectory_tokens - context)
        if budget < len(self.forced_prefix) + 1:
            return None
        self.context_length = context
        self._turn_budget = budget
        return Observation(
            tokens=tokens,
            new_sequence=new_sequence,
            stop_sequences=self.renderer.stop_sequences,
            max_tokens=budget,
            tool_choice=self.tool_choice,
            forced_prefix=list(self.forced_prefix),
        )


def _end(
    reason: StopReason, message: Message, env_messages: list[Message] | None = None
) -> StepResult:
    return StepResult(
        done=True,
        next_observation=None,
        stop_reason=reason,
        metrics={f"stop/{reason}": 1.0},
        message=message,
        env_messages=env_messages or [],
    )


# ---- one episode -----------------------------------------------------------------------------


class SampledTurn(Protocol):
    """What a sampler returns for one turn (``training.types.SampledTokens`` fits)."""

    tokens: list[int]
    """Forced-prefix tokens first, then the sampled ones (stop sequence included)."""
    sampling_logprobs: list[float]
    model_logprobs: list[float]
    num_forced: int


SampleFn = Callable[[list[int], Observation], Awaitable[SampledTurn]]
"""``sample(context, observation)``: continue ``context`` (the whole current sequence) under the
observation's budget, stop sequences and tool choice."""


async def run_episode(env: TokenEnv, sample: SampleFn) -> Trajectory:
    """Run one episode to the end and record it; ``env`` is always closed.

    An ``EnvironmentFailure`` raised by the env ends the episode as invalid (``failure`` set,
    ``ENV_FAILURE``); anything else propagates after closing.
    """
    trajectory = Trajectory()
    try:
        observation: Observation | None = await env.initial_observation()
        sequence = TokenSequence()
        trajectory.sequences.append(sequence)
        while observation is not None:
            if observation.new_sequence and len(sequence):
                sequence = TokenSequence()
                trajectory.sequences.append(sequence)
            turn = Turn(
                sequence=len(trajectory.sequences) - 1,
                observation_start=len(sequence),
                sample_start=len(sequence) + len(observation.tokens),
                sample_end=0,
                context_messages=len(getattr(env, "messages", ())),
            )
            sequence.append(observation.tokens, sampled=False)
            sampled = await sample(list(sequence.tokens), observation)
            _record_sample(sequence, sampled)
            turn.sample_end = len(sequence)
            trajectory.turns.append(turn)
            result = await env.step(sampled.tokens)
            turn.message = result.message
            turn.env_messages = list(result.env_messages)
            trajectory.metrics.update(result.metrics)
            if result.done:
                trajectory.reward = result.reward
                trajectory.stop_reason = result.stop_reason
                trajectory.failure = result.failure
            observation = result.next_observation
    except EnvironmentFailure as failure:
        trajectory.stop_reason = StopReason.ENV_FAILURE
        trajectory.failure = f"{failure.kind}: {failure}"
        trajectory.metrics[f"failure/{failure.kind}"] = 1.0
    finally:
        with anyio.CancelScope(shield=True):
            await env.close()
    trajectory.messages = list(getattr(env, "messages", ()))
    trajectory.tools = list(getattr(env, "tools", ()))
    trajectory.teacher_messages = getattr(env, "teacher_messages", None)
    trajectory.metadata = dict(getattr(env, "metadata", None) or {})
    if trajectory.stop_reason is not None:
        trajectory.metrics.setdefault(f"stop/{trajectory.stop_reason}", 1.0)
    trajectory.metrics["sequences"] = float(len(trajectory.sequences))
    return trajectory


def _record_sample(sequence: TokenSequence, sampled: SampledTurn) -> None:
    """Forced-prefix tokens are context the student did not choose (mask 0, no logprobs); the
    rest are the student's own samples (mask 1, with both logprobs)."""
    tokens, forced = list(sampled.tokens), sampled.num_forced
    for name in ("sampling_logprobs", "model_logprobs"):
        if len(getattr(sampled, name)) != len(tokens):
            raise ValueError(
                f"the sampler returned {len(tokens)} tokens but {len(getattr(sampled, name))} "
                f"{name}; expected one per token (forced prefix included)"
            )
    sequence.append(tokens[:forced], sampled=False)
    sequence.append(
        tokens[forced:],
        sampled=True,
        sampling_logprobs=list(sampled.sampling_logprobs[forced:]),
        model_logprobs=list(sampled.model_logprobs[forced:]),
    )
