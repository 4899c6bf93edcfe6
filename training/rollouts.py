"""Run a batch of env groups concurrently and record every episode as a ``Trajectory``.

``do_rollouts`` first makes the envs of every group (sandboxes are created concurrently), then
runs all episodes at once on one anyio task group. Message envs are wrapped with
``MessageTokenEnv`` and the student's renderer; token envs run under the same budgets
(``TokenBudget``). Each turn asks the ``Policy`` for tokens: ``SamplerPolicy`` calls the sampler,
which batches the pending turns of all running episodes into one forward pass;
``ScriptedPolicy`` replays given assistant messages (teacher-forced demonstrations, e.g. a
task's reference solution for an SFT warm start).

Failures of the infrastructure never become training data: an ``EnvironmentFailure`` (a dead
sandbox, a grader that cannot grade, a teacher server that is down) while making envs, during an
episode or in ``compute_group_rewards`` marks the episodes invalid (``Trajectory.failure``,
metric ``failure/<kind>``); they are counted and skipped by the trainer. So does a call into the
env's code that does not return within ``env_timeout_s`` (``failure/timeout``). Every env is
closed, also after errors and cancellation. A reward that is not a finite number, or a reward
function that raises, is a bug (``RewardError``): the other episodes finish, then it is raised
with every episode of the batch attached (the trainer writes them first). A dataset, builder or
env that breaks the protocols of ``envs.types`` is an ``EnvProtocolError``; any other exception
is a bug and propagates at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from tqdm.auto import tqdm

from envs.mixture import RoutedGroupBuilder
from envs.types import Dataset, Env, EnvGroupBuilder
from tool_use.errors import EnvironmentFailure, RewardError
from tool_use.renderers.base import Renderer
from tool_use.rewards import as_reward, check_reward, describe
from tool_use.token_env import MessageTokenEnv, PromptTooLongError, SampleFn, run_episode
from tool_use.trajectory import Trajectory
from tool_use.types import (
    Message,
    MessageEnv,
    Observation,
    StepResult,
    StopReason,
    TokenEnv,
    ToolChoice,
    ToolSpec,
)
from training.errors import EnvProtocolError
from training.types import SampledTokens, Sampler, SamplingParams

log = logging.getLogger(__name__)


DEFAULT_ENV_TIMEOUT_S = 3600.0
"""Well above what Harbor envs take on their own (an image build: 600 s, a bash command: 30 s,
grading: the task's ``[verifier].timeout_sec``, 600 s by default)."""


@dataclass(frozen=True)
class RolloutSettings:
    """How message envs become token envs (``MessageTokenEnv``'s budgets and tool choice)."""

    max_tokens: int = 256
    """Sampling budget of one assistant turn."""
    max_trajectory_tokens: int | None = 2048
    """Budget of a whole training sequence (prompt, env answers and samples)."""
    tool_choice: ToolChoice = "auto"
    """``required`` forces the renderer's tool-call envelope opening on every turn."""
    env_timeout_s: float | None = DEFAULT_ENV_TIMEOUT_S
    """The longest one call into the env's code may take: ``make_envs``, an env's first
    observation, one step (its tools and reward included), ``compute_group_rewards``,
    ``close``. Past it the episode (the group, for ``make_envs`` and ``compute_group_rewards``)
    is invalid, ``failure/timeout``; a ``close`` past it is abandoned with a warning. None: no
    limit. Sampling the student's turns is not counted."""


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
        # do_rollouts gives every observation a budget (its own, else the max_tokens setting); 256
        # only stands in when the policy is driven by hand with an observation that has none
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


def get_batch(dataset: Dataset, index: int, *, step: int | None = None) -> list[EnvGroupBuilder]:
    """``dataset.get_batch(index)`` as a list, checked: any iterable of group builders is taken
    (a generator is read once); nothing else, no builders at all, or an ``IndexError`` for a
    batch that ``len(dataset)`` promised is an ``EnvProtocolError`` naming the dataset, the
    index (and ``step``) and its length."""
    name = type(dataset).__name__
    call = f"{name}.get_batch({index})" + (f" (step {step})" if step is not None else "")
    try:
        batch = dataset.get_batch(index)
    except IndexError as error:
        raise EnvProtocolError(
            f"{call} raised IndexError ({error}), but len({name}) is {len(dataset)}, which "
            f"promises batches 0 to {len(dataset) - 1}; make __len__ count the batches get_batch "
            "can give"
        ) from error
    expected = (
        "expected a list of EnvGroupBuilders (make_envs, compute_group_rewards, logging_tags)"
    )
    if isinstance(batch, str | bytes | Mapping) or not isinstance(batch, Iterable):
        raise EnvProtocolError(f"{call} returned {describe(batch)}; {expected}")
    builders = list(batch)
    if not builders:
        raise EnvProtocolError(f"{call} returned no group builders; {expected}, at least one")
    for position, builder in enumerate(builders):
        if not isinstance(builder, EnvGroupBuilder):
            raise EnvProtocolError(
                f"{call} returned {describe(builder)} at position {position}; {expected}"
            )
    return builders


def as_token_env(env: Env, renderer: Renderer, settings: RolloutSettings) -> TokenEnv:
    """Message envs wrapped with the student's renderer (``MessageTokenEnv``); token envs under
    the same budgets (``TokenBudget``)."""
    if hasattr(env, "initial_observation"):
        return TokenBudget(env, settings.max_tokens, settings.max_trajectory_tokens)  # type: ignore[arg-type]
    return MessageTokenEnv(
        env,  # type: ignore[arg-type]
        renderer,
        max_tokens=settings.max_tokens,
        max_trajectory_tokens=settings.max_trajectory_tokens,
        tool_choice=settings.tool_choice,
    )


class TokenBudget:
    """A token env under the trainer's budgets (implements ``TokenEnv``), as ``MessageTokenEnv``
    puts message envs under them: an observation without ``max_tokens`` gets ``max_tokens``, and
    every turn's budget is clipped to what ``max_trajectory_tokens`` leaves of the current
    sequence. When not even one token fits, the episode ends with ``CONTEXT_OVERFLOW`` and
    reward 0 without asking the env (on the first observation: ``PromptTooLongError``).
    Everything else — stop sequences, tool choice, the env's own stop reasons — is the env's."""

    def __init__(self, env: TokenEnv, max_tokens: int, max_trajectory_tokens: int | None) -> None:
        self.env = env
        self.max_tokens = max_tokens
        self.max_trajectory_tokens = max_trajectory_tokens
        self.context_length = 0
        """Tokens in the current sequence so far."""

    def __getattr__(self, name: str) -> Any:
        # the env's own messages, tools, metadata, teacher_messages, ...
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    async def initial_observation(self) -> Observation:
        first = await self.env.initial_observation()
        observation = self._fit(first)
        if observation is None:
            raise PromptTooLongError(
                f"the first observation of {type(self.env).__name__} is {len(first.tokens)} "
                "tokens, which leaves no room to sample within "
                f"max_trajectory_tokens={self.max_trajectory_tokens}"
            )
        return observation

    async def step(self, sampled: Sequence[int]) -> StepResult:
        self.context_length += len(sampled)
        result = await self.env.step(sampled)
        if result.done or result.next_observation is None:
            return result
        observation = self._fit(result.next_observation)
        if observation is None:
            reason = StopReason.CONTEXT_OVERFLOW
            return dataclasses.replace(
                result,
                done=True,
                next_observation=None,
                reward=0.0,
                stop_reason=reason,
                metrics={**result.metrics, f"stop/{reason}": 1.0},
            )
        return dataclasses.replace(result, next_observation=observation)

    async def close(self) -> None:
        await self.env.close()

    def _fit(self, observation: Observation) -> Observation | None:
        """``observation`` with its turn budget, or None when no token fits after it."""
        context = (0 if observation.new_sequence else self.context_length) + len(observation.tokens)
        budget = self.max_tokens if observation.max_tokens is None else observation.max_tokens
        if self.max_trajectory_tokens is not None:
            budget = min(budget, self.max_trajectory_tokens - context)
        if budget < len(observation.forced_prefix) + 1:
            return None
        self.context_length = context
        return dataclasses.replace(observation, max_tokens=budget)


def invalid_trajectory(failure: EnvironmentFailure, metadata: dict[str, Any]) -> Trajectory:
    """The record of an episode that could not run (its envs were never made)."""
    return Trajectory(
        stop_reason=StopReason.ENV_FAILURE,
        failure=f"{failure.kind}: {failure}",
        metrics={f"failure/{failure.kind}": 1.0, f"stop/{StopReason.ENV_FAILURE}": 1.0},
        metadata=dict(metadata),
    )


def builder_name(builder: EnvGroupBuilder) -> str:
    """The class name of the user's builder (inside a mixture's routing wrapper too)."""
    while isinstance(builder, RoutedGroupBuilder):
        builder = builder.inner
    return type(builder).__name__


@dataclass(frozen=True)
class _Group:
    """Names one group of a batch in messages: its builder's class and its index."""

    name: str
    index: int

    def __str__(self) -> str:
        return f"{self.name} (group {self.index})"

    def call(self, method: str) -> str:
        return f"{self.name}.{method}() (group {self.index})"


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

    A group whose envs cannot be made (or not within ``settings.env_timeout_s``) counts as one
    invalid episode. Group rewards (``compute_group_rewards`` over the valid episodes) are added
    to each episode's reward. Trajectory metadata gains ``group`` (the builder's index),
    ``builder`` (its class name) and ``tags``. A ``RewardError`` is raised once every episode
    has finished, with all of them in its ``trajectories``."""
    settings = settings or RolloutSettings()
    groups = [_Group(builder_name(b), index) for index, b in enumerate(builders)]
    tags = [_logging_tags(b, g) for b, g in zip(builders, groups, strict=True)]
    envs = await _make_all_envs(builders, groups, settings.env_timeout_s)
    # Envs no episode has taken charge of yet (``run_episode`` closes the ones it runs).
    unclosed = {id(env): env for made in envs if isinstance(made, list) for env in made}
    bar = _Progress(sum(len(e) if isinstance(e, list) else 1 for e in envs), progress)
    results: list[list[Trajectory]] = [[] for _ in builders]
    bugs: list[RewardError] = []
    episodes: list[tuple[_Episode, list[Trajectory], int]] = []
    for index, made in enumerate(envs):
        meta = {"group": index, "builder": groups[index].name, "tags": tags[index]}
        if isinstance(made, EnvironmentFailure):
            results[index].append(invalid_trajectory(made, meta))
            bar.episode()
            continue
        results[index] = [Trajectory() for _ in made]
        for slot, env in enumerate(made):
            episode = _Episode(
                env, policy, renderer, settings, meta, bar, unclosed, groups[index], bugs
            )
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
                await _close(env, f"{type(env).__name__}.close()", settings.env_timeout_s)
    out = []
    for index, builder in enumerate(builders):
        try:
            await _add_group_rewards(builder, results[index], groups[index], settings)
        except RewardError as bug:
            _invalidate(results[index], EnvironmentFailure(str(bug), kind="reward_fn"))
            bugs.append(bug)
        out.append(TrajectoryGroup(results[index], tags[index]))
    if bugs:
        bugs[0].trajectories = [t for group in out for t in group.trajectories]
        raise bugs[0]
    return out


def _single(errors: BaseExceptionGroup) -> BaseException:
    """The first real error inside anyio's (nested) exception groups; the others stay
    reachable through its ``__cause__``."""
    for error in errors.exceptions:
        found = _single(error) if isinstance(error, BaseExceptionGroup) else error
        if not isinstance(found, anyio.get_cancelled_exc_class()):
            return found
    return errors


def _logging_tags(builder: EnvGroupBuilder, group: _Group) -> list[str]:
    tags = builder.logging_tags()
    if isinstance(tags, list | tuple) and all(isinstance(t, str) and t for t in tags):
        return list(dict.fromkeys(tags))
    shown = repr(tags)[:80] if isinstance(tags, list | tuple) else describe(tags)
    raise EnvProtocolError(
        f"{group.call('logging_tags')} returned {shown}; expected a list of non-empty str, "
        "such as ['calculator']"
    )


async def _close(env: Any, what: str, timeout_s: float | None) -> None:
    """``env.close()``; abandoned with a warning when it does not return within ``timeout_s``."""
    with anyio.move_on_after(timeout_s) as scope:
        await env.close()
    if scope.cancelled_caught:
        log.warning(
            "%s did not return within %g s (env_timeout_s): abandoned, what it holds may leak",
            what,
            timeout_s,
        )


async def _make_all_envs(
    builders: Sequence[EnvGroupBuilder], groups: Sequence[_Group], timeout_s: float | None
) -> list[list[Env] | EnvironmentFailure]:
    """``make_envs`` of every builder, concurrently, each within ``timeout_s``. An
    ``EnvironmentFailure`` (or a timeout) stands in for the envs of its group; on any other error
    every env already made is closed before raising."""
    made: list[list[Env] | EnvironmentFailure | None] = [None] * len(builders)

    async def make(index: int, builder: EnvGroupBuilder) -> None:
        call = groups[index].call("make_envs")
        try:
            with anyio.move_on_after(timeout_s) as scope:
                envs = await builder.make_envs()
        except EnvironmentFailure as failure:
            log.warning("%s could not make its envs: %s", call, failure)
            made[index] = failure
            return
        except Exception as error:
            error.add_note(f"raised by {call}")
            raise
        if scope.cancelled_caught:
            made[index] = EnvironmentFailure(
                f"{call} did not return within {timeout_s:g} s (env_timeout_s)", kind="timeout"
            )
            log.warning("%s: the group counts as one invalid episode", made[index])
            return
        made[index] = await _checked_envs(envs, call, timeout_s)

    try:
        async with anyio.create_task_group() as group:
            for index, builder in enumerate(builders):
                group.start_soon(make, index, builder)
    except BaseException as error:
        with anyio.CancelScope(shield=True):
            for envs in made:
                if isinstance(envs, list):
                    for env in envs:
                        await _close(env, f"{type(env).__name__}.close()", timeout_s)
        if isinstance(error, BaseExceptionGroup):
            raise _single(error) from error
        raise
    return [m for m in made if m is not None]


async def _checked_envs(envs: Any, call: str, timeout_s: float | None) -> list[Env]:
    """What ``make_envs`` returned, if it is a non-empty sequence of envs; otherwise the envs
    among it are closed and an ``EnvProtocolError`` says what came back instead."""
    expected = "expected a non-empty list of MessageEnv or TokenEnv objects"
    if isinstance(envs, str | bytes) or not isinstance(envs, Sequence):
        raise EnvProtocolError(f"{call} returned {describe(envs)}; {expected}")
    envs = list(envs)
    bad = [(i, env) for i, env in enumerate(envs) if not isinstance(env, MessageEnv | TokenEnv)]
    if envs and not bad:
        return envs
    with anyio.CancelScope(shield=True):
        for env in envs:
            if isinstance(env, MessageEnv | TokenEnv):
                await _close(env, f"{type(env).__name__}.close()", timeout_s)
    if not envs:
        raise EnvProtocolError(f"{call} returned an empty list; {expected}")
    position, env = bad[0]
    raise EnvProtocolError(
        f"{call} returned {describe(env)} at position {position}; {expected} (a MessageEnv has "
        "tools, initial_messages, step and close; a TokenEnv initial_observation, step and close)"
    )


class _Guarded:
    """The token env of one episode as ``run_episode`` sees it. Each call into the env's code
    is bounded by ``timeout_s``: past it the episode ends as invalid (``EnvironmentFailure`` of
    kind ``timeout``) with a warning naming the group and what hung. A reward that breaks its
    contract (``RewardError``, or a final ``StepResult.reward`` that is not a finite number) is
    kept in ``bugs`` and ends the episode as invalid (kind ``reward_fn``), so the batch's other
    episodes still finish before ``do_rollouts`` raises it."""

    def __init__(
        self,
        env: TokenEnv,
        *,
        group: _Group,
        name: str,
        timeout_s: float | None,
        bugs: list[RewardError],
    ) -> None:
        self.env = env
        self.group = group
        self.name = name
        """The class name of the user's env."""
        self.timeout_s = timeout_s
        self.bugs = bugs

    def __getattr__(self, name: str) -> Any:
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    async def initial_observation(self) -> Observation:
        return await self._call("initial_observation", self.env.initial_observation)

    async def step(self, sampled: Sequence[int]) -> StepResult:
        result: StepResult = await self._call("step", lambda: self.env.step(sampled))
        if result.done and result.failure is None:
            try:
                result.reward = check_reward(
                    result.reward, f"{self.name}.step() (its final StepResult.reward)"
                )
            except RewardError as bug:
                raise self._bug(bug) from bug
        return result

    async def close(self) -> None:
        await _close(self.env, f"{self.group}: {self.name}.close()", self.timeout_s)

    async def _call(self, method: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            with anyio.move_on_after(self.timeout_s) as scope:
                return await call()
        except RewardError as bug:
            raise self._bug(bug) from bug
        assert scope.cancelled_caught
        log.warning(
            "%s: %s.%s() did not return within %g s (env_timeout_s): the episode is invalid "
            "(failure/timeout)",
            self.group,
            self.name,
            method,
            self.timeout_s,
        )
        raise EnvironmentFailure(
            f"{self.name}.{method}() did not return within {self.timeout_s:g} s (env_timeout_s)",
            kind="timeout",
        )

    def _bug(self, bug: RewardError) -> EnvironmentFailure:
        """Keep ``bug`` (named with the group, chained from the original exception) for
        ``do_rollouts`` to raise; the episode ends as invalid meanwhile."""
        named = RewardError(f"{self.group}: {bug}")
        named.__cause__ = bug.__cause__
        self.bugs.append(named)
        return EnvironmentFailure(str(named), kind="reward_fn")


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
    group: _Group
    bugs: list[RewardError]
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
            guarded = _Guarded(
                token_env,
                group=self.group,
                name=type(self.env).__name__,
                timeout_s=self.settings.env_timeout_s,
                bugs=self.bugs,
            )

            async def counted(context: list[int], observation: Observation) -> SampledTokens:
                sampled = await sample(context, observation)
                self.bar.turn()
                return sampled

            del self.unclosed[id(self.env)]  # from here on run_episode closes it
            try:
                trajectory = await run_episode(guarded, counted)  # type: ignore[arg-type]
            except PromptTooLongError as error:
                failure = EnvironmentFailure(str(error), "prompt_too_long")
                trajectory = invalid_trajectory(failure, {})
        finally:
            with anyio.CancelScope(shield=True):
                await self.exit()
        trajectory.metadata.update(self.metadata)
        results[slot] = trajectory
        self.bar.episode()


def _invalidate(trajectories: Sequence[Trajectory], failure: EnvironmentFailure) -> None:
    """Mark the valid ones of ``trajectories`` invalid because of ``failure``."""
    for trajectory in trajectories:
        if trajectory.valid:
            trajectory.failure = f"{failure.kind}: {failure}"
            trajectory.metrics[f"failure/{failure.kind}"] = 1.0


async def _add_group_rewards(
    builder: EnvGroupBuilder,
    trajectories: list[Trajectory],
    group: _Group,
    settings: RolloutSettings,
) -> None:
    valid = [t for t in trajectories if t.valid]
    if not valid:
        return
    call = group.call("compute_group_rewards")
    expected = (
        f"expected a list of {len(valid)} finite real numbers, one per valid trajectory (raise "
        "EnvironmentFailure when they cannot be computed, which makes the episodes invalid)"
    )
    try:
        with anyio.move_on_after(settings.env_timeout_s) as scope:
            extra = await builder.compute_group_rewards(valid)
    except EnvironmentFailure as failure:
        _invalidate(valid, failure)
        return
    except Exception as error:
        raise RewardError(f"{call} raised {type(error).__name__}: {error}; {expected}") from error
    if scope.cancelled_caught:
        failure = EnvironmentFailure(
            f"{call} did not return within {settings.env_timeout_s:g} s (env_timeout_s)",
            kind="timeout",
        )
        log.warning("%s: its episodes are invalid (failure/timeout)", failure)
        _invalidate(valid, failure)
        return
    if isinstance(extra, str | bytes | Mapping) or not isinstance(extra, Iterable):
        raise RewardError(f"{call} returned {describe(extra)}; {expected}")
    extra = list(extra)
    if len(extra) != len(valid):
        raise RewardError(
            f"{call} returned {len(extra)} rewards for {len(valid)} trajectories; {expected}"
        )
    rewards = [as_reward(value) for value in extra]
    for position, (value, reward) in enumerate(zip(extra, rewards, strict=True)):
        if reward is None:
            raise RewardError(f"{call} returned {describe(value)} as reward {position}; {expected}")
    for trajectory, reward in zip(valid, rewards, strict=True):
        trajectory.reward += reward  # type: ignore[operator]
