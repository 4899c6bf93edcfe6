"""Run a batch of env groups concurrently and record every episode as a ``Trajectory``.

``do_rollouts`` first makes the envs of every group (sandboxes are created concurrently), then
runs all episodes at once on one anyio task group. Message envs are wrapped with
``MessageTokenEnv`` and the student's renderer; token envs run as they are. Each turn asks the
``Policy`` for tokens: ``SamplerPolicy`` calls the sampler, which batches the pending turns of
all running episodes into one forward pass; ``ScriptedPolicy`` replays given assistant messages
(teacher-forced demonstrations, e.g. a task's reference solution for an SFT warm start).

Failures of the infrastructure never become training data: an ``EnvironmentFailure`` (a dead
sandbox, a grader that cannot grade, a teacher server that is down) while making envs, during an
episode or in ``compute_group_rewards`` marks the episodes invalid (``Trajectory.failure``,
metric ``failure/<kind>``); they are counted and skipped by the trainer. Every env is closed,
also after errors and cancellation. Any other exception is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from tqdm.auto import tqdm

from envs.types import Env, EnvGroupBuilder
from tool_use.errors import EnvironmentFailure
from tool_use.renderers.base import Renderer
from tool_use.token_env import MessageTokenEnv, PromptTooLongError, SampleFn, run_episode
from tool_use.trajectory import Trajectory
from tool_use.types import Message, Observation, StopReason, TokenEnv, ToolChoice, ToolSpec
from training.types import SampledTokens, Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutSettings:
    """How message envs become token envs (``MessageTokenEnv``'s budgets and tool choice)."""

    max_tokens: int = 256
    """Sampling budget of one assistant turn."""
    max_trajectory_tokens: int | None = 2048
    """Budget of a whole training sequence (prompt, env answers and samples)."""
    tool_choice: ToolChoice = "auto"
    """``required`` forces the renderer's tool-call envelope opening on every turn."""


@dataclass
class TrajectoryGroup:
    """The episodes of one ``EnvGroupBuilder`` (one task or prompt)."""

    trajectories: list[Trajectory]
    tags: list[str] = field(default_factory=list)

    @property
    def valid(self) -> list[Trajectory]:
        return [t for t in self.trajectories if t.valid]


# ---- policies ----------------------------------------------------------------------------------


class Policy(Protocol):
    """Chooses the assistant tokens of every turn of an episode."""

    def sample_fn(self, env: TokenEnv) -> SampleFn:
        """The per-turn function of one episode (``run_episode``'s ``sample``)."""
        ...

    def track_episode(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while an episode runs (lets a batching sampler know how many to wait for)."""
        ...


class SamplerPolicy:
    """The student: each turn is sampled from ``sampler`` under the observation's budget, stop
    sequences and tool choice, at the given temperature and filters."""

    def __init__(
        self, sampler: Sampler, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
    ) -> None:
        self.sampler = sampler
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k

    def params(self, observation: Observation) -> SamplingParams:
        return SamplingParams(
            max_tokens=observation.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_sequences=tuple(tuple(s) for s in observation.stop_sequences),
            tool_choice=observation.tool_choice,
            forced_prefix=tuple(observation.forced_prefix),
        )

    def sample_fn(self, env: TokenEnv) -> SampleFn:
        async def sample(context: list[int], observation: Observation) -> SampledTokens:
            return await self.sampler.sample(context, self.params(observation))

        return sample

    def track_episode(self) -> contextlib.AbstractAsyncContextManager[None]:
        track = getattr(self.sampler, "track_episode", None)
        return track() if track is not None else contextlib.nullcontext()


Script = Callable[[TokenEnv], Sequence[Message]]
"""The assistant messages to replay in one episode, in order (given the env, e.g. its
``metadata["task"]``)."""


class ScriptedPolicy:
    """Replays scripted assistant messages as if the student had sampled them (teacher forcing).

    Each message is turned into exactly the tokens the renderer would produce for it
    (``assistant_tokens``), so the recorded trajectory has real env answers (the tools really
    run) and mask 1 on the demonstration's tokens: SFT data in the trainer's own format. The
    logprobs are 0.0 (no model sampled them). A script that runs out ends the episode with a
    plain ``Done.`` message."""

    def __init__(self, script: Script, renderer: Renderer) -> None:
        self.script = script
        self.renderer = renderer

    def sample_fn(self, env: TokenEnv) -> SampleFn:
        messages = list(self.script(env))
        turn = 0

        async def sample(context: list[int], observation: Observation) -> SampledTokens:
            nonlocal turn
            message = (
                messages[turn]
                if turn < len(messages)
                else Message(role="assistant", content="Done.")
            )
            turn += 1
            history = list(getattr(env, "messages", ()))
            tools = list(getattr(env, "tools", ()))
            tokens = assistant_tokens(self.renderer, history, message, tools)
            if observation.max_tokens is not None:
                tokens = tokens[: observation.max_tokens]
            zeros = [0.0] * len(tokens)
            return SampledTokens(tokens, zeros, list(zeros), finish_reason="stop")

        return sample

    def track_episode(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()


def assistant_tokens(
    renderer: Renderer, history: Sequence[Message], message: Message, tools: Sequence[ToolSpec]
) -> list[int]:
    """The tokens a model would sample for ``message`` after ``history`` (stop sequence
    included), for any renderer: the difference between rendering the conversation with and
    without it. Raises ``ValueError`` when the renderer's output is not prefix-consistent."""
    probe = Message(role="user", content="(next)")
    before = renderer.render_prompt(history, tools)
    whole = renderer.render_prompt([*history, message, probe], tools)
    after = renderer.render_continuation([*history, message], [probe], tools)
    if whole[: len(before)] != before or whole[len(whole) - len(after) :] != after:
        raise ValueError(
            f"renderer {renderer.name!r} does not render an assistant turn as a pure "
            "continuation of the prompt; it cannot replay scripted messages"
        )
    tokens = whole[len(before) : len(whole) - len(after)]
    if renderer.strip_stop(tokens)[1] is False:
        raise ValueError(f"renderer {renderer.name!r}: a rendered assistant turn has no stop token")
    return tokens


# ---- rollouts ----------------------------------------------------------------------------------


def as_token_env(env: Env, renderer: Renderer, settings: RolloutSettings) -> TokenEnv:
    """Token envs as they are; message envs wrapped with the student's renderer."""
    if hasattr(env, "initial_observation"):
        return env  # type: ignore[return-value]
    return MessageTokenEnv(
        env,  # type: ignore[arg-type]
        renderer,
        max_tokens=settings.max_tokens,
        max_trajectory_tokens=settings.max_trajectory_tokens,
        tool_choice=settings.tool_choice,
    )


def invalid_trajectory(failure: EnvironmentFailure, metadata: dict[str, Any]) -> Trajectory:
    """The record of an episode that could not run (its envs were never made)."""
    return Trajectory(
        stop_reason=StopReason.ENV_FAILURE,
        failure=f"{failure.kind}: {failure}",
        metrics={f"failure/{failure.kind}": 1.0, f"stop/{StopReason.ENV_FAILURE}": 1.0},
        metadata=dict(metadata),
    )


class _Progress:
    """Episodes finished (the bar) and turns sampled (its postfix)."""

    def __init__(self, total: int, desc: str | None) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="ep", leave=False, disable=desc is None)
        self.turns = 0

    def turn(self) -> None:
        self.turns += 1
        self.bar.set_postfix(turns=self.turns, refresh=False)

    def episode(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def do_rollouts(
    builders: Sequence[EnvGroupBuilder],
    policy: Policy,
    renderer: Renderer,
    settings: RolloutSettings | None = None,
    *,
    progress: str | None = None,
) -> list[TrajectoryGroup]:
    """Every episode of every group, run concurrently; one ``TrajectoryGroup`` per builder, in
    order. ``progress`` is the progress bar's label (None: no bar).

    A group whose envs cannot be made counts as one invalid episode. Group rewards
    (``compute_group_rewards`` over the valid episodes) are added to each episode's reward.
    Trajectory metadata gains ``group`` (the builder's index) and ``tags``."""
    settings = settings or RolloutSettings()
    tags = [list(builder.logging_tags()) for builder in builders]
    envs = await _make_all_envs(builders)
    # Envs no episode has taken charge of yet (``run_episode`` closes the ones it runs).
    unclosed = {id(env): env for made in envs if isinstance(made, list) for env in made}
    bar = _Progress(sum(len(e) if isinstance(e, list) else 1 for e in envs), progress)
    results: list[list[Trajectory]] = [[] for _ in builders]
    episodes: list[tuple[_Episode, list[Trajectory], int]] = []
    for index, made in enumerate(envs):
        meta = {"group": index, "tags": tags[index]}
        if isinstance(made, EnvironmentFailure):
            results[index].append(invalid_trajectory(made, meta))
            bar.episode()
            continue
        results[index] = [Trajectory() for _ in made]
        for slot, env in enumerate(made):
            episode = _Episode(env, policy, renderer, settings, meta, bar, unclosed)
            episodes.append((episode, results[index], slot))
    try:
        # Every episode counts as running before any samples: a batching sampler then takes
        # the first turns of all of them together, in this (deterministic) order.
        for episode, _, _ in episodes:
            await episode.enter()
        async with anyio.create_task_group() as group:
            for episode, slots, slot in episodes:
                group.start_soon(episode.run, slots, slot)
    except BaseExceptionGroup as errors:
        raise _single(errors) from errors
    finally:
        bar.close()
        with anyio.CancelScope(shield=True):
            for episode, _, _ in episodes:
                await episode.exit()
            for env in unclosed.values():
                await env.close()
    out = []
    for index, builder in enumerate(builders):
        await _add_group_rewards(builder, results[index])
        out.append(TrajectoryGroup(results[index], tags[index]))
    return out


def _single(errors: BaseExceptionGroup) -> BaseException:
    """The first real error inside anyio's (nested) exception groups; the others stay
    reachable through its ``__cause__``."""
    for error in errors.exceptions:
        found = _single(error) if isinstance(error, BaseExceptionGroup) else error
        if not isinstance(found, anyio.get_cancelled_exc_class()):
            return found
    return errors


async def _make_all_envs(
    builders: Sequence[EnvGroupBuilder],
) -> list[list[Env] | EnvironmentFailure]:
    """``make_envs`` of every builder, concurrently. An ``EnvironmentFailure`` stands in for the
    envs of its group; on any other error every env already made is closed before raising."""
    made: list[list[Env] | EnvironmentFailure | None] = [None] * len(builders)

    async def make(index: int, builder: EnvGroupBuilder) -> None:
        try:
            made[index] = list(await builder.make_envs())
        except EnvironmentFailure as failure:
            log.warning("group %d: could not make its envs: %s", index, failure)
            made[index] = failure

    try:
        async with anyio.create_task_group() as group:
            for index, builder in enumerate(builders):
                group.start_soon(make, index, builder)
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            for envs in made:
                if isinstance(envs, list):
                    for env in envs:
                        await env.close()
        if isinstance(error, BaseExceptionGroup):
            raise _single(error) from error
        raise
    return [m for m in made if m is not None]


@dataclass
class _Episode:
    """One env's episode inside ``do_rollouts``."""

    env: Env
    policy: Policy
    renderer: Renderer
    settings: RolloutSettings
    metadata: dict[str, Any]
    bar: _Progress
    unclosed: dict[int, Env]
    tracking: contextlib.AsyncExitStack | None = None

    async def enter(self) -> None:
        """Register with the policy (``track_episode``) until ``exit``."""
        self.tracking = contextlib.AsyncExitStack()
        await self.tracking.enter_async_context(self.policy.track_episode())

    async def exit(self) -> None:
        if self.tracking is not None:
            tracking, self.tracking = self.tracking, None
            await tracking.aclose()

    async def run(self, results: list[Trajectory], slot: int) -> None:
        try:
            token_env = as_token_env(self.env, self.renderer, self.settings)
            sample = self.policy.sample_fn(token_env)

            async def counted(context: list[int], observation: Observation) -> SampledTokens:
                sampled = await sample(context, observation)
                self.bar.turn()
                return sampled

            del self.unclosed[id(self.env)]  # from here on run_episode closes it
            try:
                trajectory = await run_episode(token_env, counted)
            except PromptTooLongError as error:
                failure = EnvironmentFailure(str(error), "prompt_too_long")
                trajectory = invalid_trajectory(failure, {})
        finally:
            with anyio.CancelScope(shield=True):
                await self.exit()
        trajectory.metadata.update(self.metadata)
        results[slot] = trajectory
        self.bar.episode()


async def _add_group_rewards(builder: EnvGroupBuilder, trajectories: list[Trajectory]) -> None:
    valid = [t for t in trajectories if t.valid]
    if not valid:
        return
    try:
        extra = list(await builder.compute_group_rewards(valid))
    except EnvironmentFailure as failure:
        for trajectory in valid:
            trajectory.failure = f"{failure.kind}: {failure}"
            trajectory.metrics[f"failure/{failure.kind}"] = 1.0
        return
    if len(extra) != len(valid):
        raise ValueError(
            f"{type(builder).__name__}.compute_group_rewards returned {len(extra)} rewards for "
            f"{len(valid)} trajectories; expected one each"
        )
    for trajectory, reward in zip(valid, extra, strict=True):
        trajectory.reward += float(reward)
