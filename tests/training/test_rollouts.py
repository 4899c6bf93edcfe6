"""Rollouts: concurrent episodes batched by the sampler, message and token envs, exact masks,
scripted demonstrations, infrastructure failures counted (never data), envs always closed."""

from __future__ import annotations

import json

import anyio
import pytest

from tool_use.agent_env import AgentToolMessageEnv
from tool_use.errors import EnvironmentFailure
from tool_use.renderers import get_renderer
from tool_use.tool import tool
from tool_use.trajectory import Trajectory
from tool_use.types import Message, Observation, StepResult, StopReason, ToolCall
from training.metrics import rollout_metrics, success_metrics
from training.rollouts import (
    RolloutSettings,
    SamplerPolicy,
    ScriptedPolicy,
    assistant_tokens,
    do_rollouts,
)
from training.samplers import HFSampler

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def renderer(smollm2_tokenizer):
    return get_renderer(None, smollm2_tokenizer)


class Counter:
    """Counts closes and tool runs across the envs of a test."""

    def __init__(self) -> None:
        self.closed = 0
        self.ran: list[str] = []


def make_echo_env(counter: Counter, *, fail_on: str | None = None, **kwargs) -> AgentToolMessageEnv:
    @tool
    async def shout(text: str) -> str:
        """Shout text back."""
        counter.ran.append(text)
        if text == fail_on:
            raise EnvironmentFailure("the machine behind the tool died", kind="sandbox")
        return text.upper()

    async def close() -> None:
        counter.closed += 1

    return AgentToolMessageEnv(
        initial_messages=[Message(role="user", content="Shout hello.")],
        tools=[shout],
        on_close=close,
        **kwargs,
    )


class Group:
    """An EnvGroupBuilder of ``size`` envs made by ``make``."""

    def __init__(self, make, size: int = 2, *, bonus: float = 0.0, fail: Exception | None = None):
        self.make, self.size, self.bonus, self.fail = make, size, bonus, fail
        self.seen: list[int] = []

    async def make_envs(self):
        if self.fail is not None:
            raise self.fail
        return [self.make() for _ in range(self.size)]

    async def compute_group_rewards(self, trajectories):
        self.seen.append(len(trajectories))
        return [self.bonus] * len(trajectories)

    def logging_tags(self):
        return ["toy"]


def shout_script(*texts: str):
    """Call ``shout`` once per text, then answer without a tool call."""

    def script(env) -> list[Message]:
        calls = [
            Message(
                role="assistant",
                content="",
                tool_calls=[ToolCall(id=f"c{i}", name="shout", arguments=json.dumps({"text": t}))],
            )
            for i, t in enumerate(texts)
        ]
        return [*calls, Message(role="assistant", content="All done.")]

    return script


async def test_sampled_episodes_run_concurrently_in_shared_batches(tiny_model, renderer):
    counter = Counter()
    sampler = HFSampler(tiny_model, seed=0, batch_window_s=1.0)
    groups = [Group(lambda: make_echo_env(counter, max_turns=2), size=3) for _ in range(2)]
    settings = RolloutSettings(max_tokens=16, max_trajectory_tokens=600, tool_choice="required")
    out = await do_rollouts(groups, SamplerPolicy(sampler), renderer, settings)

    assert [len(g.trajectories) for g in out] == [3, 3]
    assert counter.closed == 6
    # the six first turns were admitted together (the sampler waits for every tracked episode)
    assert sampler.stats["admissions"] < sampler.stats["rows"]
    for index, group in enumerate(out):
        for t in group.trajectories:
            assert t.valid and t.metadata["group"] == index and t.metadata["tags"] == ["toy"]
            (sequence,) = t.sequences
            forced = len(renderer.tool_call_prefix)
            for turn in t.turns:
                # forced envelope prefix: context (mask 0); then the student's own tokens
                assert sequence.mask[turn.sample_start : turn.sample_start + forced] == [0] * forced
                sampled = sequence.mask[turn.sample_start + forced : turn.sample_end]
                assert sampled and all(sampled)
                assert all(
                    lp < 0
                    for lp in sequence.sampling_logprobs[
                        turn.sample_start + forced : turn.sample_end
                    ]
                )
            assert sum(sequence.mask) == t.num_sampled_tokens


async def test_scripted_policy_replays_exact_tokens_and_runs_the_tools(renderer):
    counter = Counter()
    groups = [Group(lambda: make_echo_env(counter, max_turns=5), size=2)]
    policy = ScriptedPolicy(shout_script("hi", "there"), renderer)
    (group,) = await do_rollouts(groups, policy, renderer, RolloutSettings(max_tokens=64))

    assert counter.ran == ["hi", "there"] * 2 and counter.closed == 2
    for t in group.trajectories:
        assert t.stop_reason == StopReason.NO_TOOL_CALL
        assert [m.content for m in t.messages if m.role == "tool"] == ["HI", "THERE"]
        (sequence,) = t.sequences
        for turn in t.turns:
            tokens = sequence.tokens[turn.sample_start : turn.sample_end]
            assert sequence.mask[turn.sample_start : turn.sample_end] == [1] * len(tokens)
            parsed = renderer.parse(tokens).message
            assert parsed.content == turn.message.content
            assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
                (c.name, c.arguments) for c in turn.message.tool_calls
            ]
        # everything outside the assistant turns is context
        student = {i for turn in t.turns for i in range(turn.sample_start, turn.sample_end)}
        assert all(m == (i in student) for i, m in enumerate(sequence.mask))


def test_assistant_tokens_are_what_the_renderer_continues_with(renderer):
    call = ToolCall(id="c", name="shout", arguments='{"text": "hi"}')
    message = Message(role="assistant", content="", tool_calls=[call])
    history = [Message(role="user", content="Shout hello.")]
    tokens = assistant_tokens(renderer, history, message, [])
    assert renderer.strip_stop(tokens)[1]
    parsed = renderer.parse(tokens)
    assert parsed.parse_error is None
    assert [(c.name, c.arguments) for c in parsed.message.tool_calls] == [("shout", call.arguments)]
    full = renderer.render_prompt(history) + tokens
    answer = renderer.render_continuation([*history, message], [Message(role="user", content="x")])
    assert full + answer == renderer.render_prompt(
        [*history, message, Message(role="user", content="x")]
    )


async def test_environment_failures_mark_episodes_invalid_and_are_counted(renderer):
    counter = Counter()
    dead = EnvironmentFailure("no sandbox could be created", kind="sandbox")
    groups = [
        Group(lambda: make_echo_env(counter, fail_on="there", max_turns=5), size=2, bonus=0.5),
        Group(lambda: make_echo_env(counter), fail=dead),
        Group(lambda: make_echo_env(counter, max_turns=5), size=1, bonus=0.25),
    ]
    policy = ScriptedPolicy(shout_script("hi", "there"), renderer)
    failing, unmade, healthy = await do_rollouts(groups, policy, renderer)

    assert counter.closed == 3  # every env that was made, failed episodes included
    assert all(not t.valid and t.failure.startswith("sandbox:") for t in failing.trajectories)
    assert groups[0].seen == []  # no group reward over invalid episodes
    (placeholder,) = unmade.trajectories
    assert not placeholder.valid and placeholder.stop_reason == StopReason.ENV_FAILURE
    (ok,) = healthy.trajectories
    assert ok.valid and ok.reward == 0.25 and groups[2].seen == [1]

    metrics = rollout_metrics([*failing.trajectories, placeholder, ok])
    assert metrics["episodes"] == 4 and metrics["episodes/invalid"] == 3
    assert metrics["failure/sandbox"] == 3
    assert metrics["stop/env_failure"] == 0.75 and metrics["stop/no_tool_call"] == 0.25
    assert metrics["tokens/student"] == ok.num_sampled_tokens  # invalid ones are not data
    assert metrics["env/tool_calls"] == 2.0


async def test_a_bug_propagates_and_every_env_is_still_closed(renderer):
    counter = Counter()

    def broken_script(env):
        raise RuntimeError("bug in the policy")

    groups = [Group(lambda: make_echo_env(counter), size=2) for _ in range(2)]
    with pytest.raises(RuntimeError, match="bug in the policy"):
        await do_rollouts(groups, ScriptedPolicy(broken_script, renderer), renderer)
    assert counter.closed == 4


async def test_cancelled_rollouts_close_every_env(renderer):
    counter = Counter()

    @tool
    async def wait(seconds: float) -> str:
        """Wait."""
        await anyio.sleep(seconds)
        return "waited"

    async def close() -> None:
        counter.closed += 1

    def make():
        return AgentToolMessageEnv(
            initial_messages=[Message(role="user", content="Wait.")], tools=[wait], on_close=close
        )

    def script(env):
        call = ToolCall(id="c", name="wait", arguments='{"seconds": 60}')
        return [Message(role="assistant", content="", tool_calls=[call])]

    with anyio.move_on_after(1.0):
        await do_rollouts([Group(make, size=3)], ScriptedPolicy(script, renderer), renderer)
    assert counter.closed == 3


class CountdownEnv:
    """A token-level env: the prompt is fixed ids; each turn answers with two fixed ids until
    ``turns`` turns were sampled; reward 1 at the end."""

    def __init__(self, prompt: list[int], turns: int = 2) -> None:
        self.prompt, self.left, self.closed = prompt, turns, False

    async def initial_observation(self) -> Observation:
        return Observation(tokens=list(self.prompt), max_tokens=4)

    async def step(self, sampled) -> StepResult:
        self.left -= 1
        if self.left == 0:
            return StepResult(
                done=True, next_observation=None, reward=1.0, stop_reason=StopReason.NO_TOOL_CALL
            )
        return StepResult(done=False, next_observation=Observation(tokens=[5, 6], max_tokens=4))

    async def close(self) -> None:
        self.closed = True


async def test_token_envs_run_as_they_are(tiny_model, renderer):
    group = Group(lambda: None)
    made = []

    async def make_envs():
        out = [CountdownEnv([1, 2, 3], turns=3) for _ in range(2)]
        made.extend(out)
        return out

    group.make_envs = make_envs
    sampler = HFSampler(tiny_model, seed=0)
    (out,) = await do_rollouts([group], SamplerPolicy(sampler), renderer)
    assert all(env.closed for env in made)
    for t in out.trajectories:
        assert t.valid and t.reward == 1.0 and len(t.turns) == 3
        (sequence,) = t.sequences
        assert sequence.tokens[:3] == [1, 2, 3]
        assert sequence.mask[:3] == [0, 0, 0]
        assert sum(sequence.mask) == 12  # three turns of exactly max_tokens=4 sampled tokens
        assert sequence.tokens[t.turns[1].observation_start : t.turns[1].sample_start] == [5, 6]


def test_success_metrics_count_reward_one_among_valid_episodes():
    solved = Trajectory(reward=1.0)
    failed = Trajectory(reward=0.0)
    invalid = Trajectory(failure="grading: no reward file", metrics={"failure/grading": 1.0})
    metrics = success_metrics([solved, failed, failed, invalid])
    assert metrics["eval/success_rate"] == pytest.approx(1 / 3)
    assert metrics["eval/reward_mean"] == pytest.approx(1 / 3)
    assert metrics["eval/episodes/invalid"] == 1 and metrics["eval/failure/grading"] == 1
