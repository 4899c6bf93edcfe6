"""When a token budget ends an episode (MAX_TOKENS, CONTEXT_OVERFLOW), the token env asks the
message env's optional ``finish`` for the outcome, so a verifier still grades the episode
(Harbor grades however the agent stopped); envs without ``finish`` keep reward 0."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tool_use import AgentToolMessageEnv, EnvironmentFailure, Message, StopReason, tool
from tool_use.renderers import get_renderer
from tool_use.token_env import MessageTokenEnv, run_episode
from tool_use.types import MessageStepResult, Observation, ParsedResponse

pytestmark = pytest.mark.anyio

PROMPT = [Message(role="user", content="Write a file, then say done.")]
CALL = '<tool_call>\n{"name": "touch", "arguments": {"name": "a"}}\n</tool_call><|im_end|>'
LONG_ANSWER = "I am going to explain at great length what I did and why.<|im_end|>"
STATE: dict[str, int] = {}


@tool
def touch(name: str) -> str:
    """Create a file."""
    STATE[name] = STATE.get(name, 0) + 1
    return f"created {name}"


@dataclass
class Sample:
    tokens: list[int]
    sampling_logprobs: list[float]
    model_logprobs: list[float]
    num_forced: int = 0


def scripted(renderer, texts: list[str]):
    texts = list(texts)

    async def sample(context: list[int], observation: Observation) -> Sample:
        tokens = renderer.encode(texts.pop(0))[: observation.max_tokens]
        return Sample(tokens, [-0.1] * len(tokens), [-0.1] * len(tokens))

    return sample


class Graded:
    """A reward that looks at the world (like a Harbor verifier) and records what it saw."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[list[Message]] = []

    async def __call__(self, messages) -> float:
        self.seen.append(list(messages))
        if self.fail:
            raise EnvironmentFailure("the verifier could not run", kind="grading")
        return float(STATE.get("a", 0) > 0)


@pytest.fixture
def smol(chat_tokenizers):
    return get_renderer(None, chat_tokenizers["smollm2"])


@pytest.fixture(autouse=True)
def clean_state():
    STATE.clear()


async def test_a_turn_cut_by_max_tokens_is_still_graded(smol):
    reward = Graded()
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[touch], reward_fn=reward)
    token_env = MessageTokenEnv(env, smol, max_tokens=40)
    trajectory = await run_episode(token_env, scripted(smol, [CALL, LONG_ANSWER * 3]))
    assert trajectory.stop_reason is StopReason.MAX_TOKENS
    assert trajectory.reward == 1.0 and trajectory.valid
    (seen,) = reward.seen
    assert [m.role for m in seen] == ["user", "assistant", "tool", "assistant"]
    assert seen[-1].content.startswith("I am going to explain")  # the cut-off turn, never run
    assert trajectory.metrics["stop/max_tokens"] == 1.0 and trajectory.metrics["turns"] == 2.0
    assert trajectory.metrics["tool_calls"] == 1.0


async def test_an_answer_that_overflows_the_context_is_still_graded(smol):
    prompt = smol.render_prompt(PROMPT, [touch.spec])
    call = smol.encode(CALL)
    reward = Graded()
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[touch], reward_fn=reward)
    token_env = MessageTokenEnv(
        env, smol, max_tokens=64, max_trajectory_tokens=len(prompt) + len(call) + 3
    )
    trajectory = await run_episode(token_env, scripted(smol, [CALL]))
    assert trajectory.stop_reason is StopReason.CONTEXT_OVERFLOW
    assert trajectory.reward == 1.0 and STATE == {"a": 1}  # the tool ran, then it was graded
    assert [m.role for m in reward.seen[0]] == ["user", "assistant", "tool"]


async def test_a_grader_failure_after_a_cut_makes_the_episode_invalid(smol):
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[touch], reward_fn=Graded(fail=True))
    trajectory = await run_episode(
        MessageTokenEnv(env, smol, max_tokens=5), scripted(smol, [LONG_ANSWER])
    )
    assert not trajectory.valid and trajectory.stop_reason is StopReason.ENV_FAILURE
    assert trajectory.failure.startswith("grading: the verifier could not run")
    assert trajectory.metrics["failure/grading"] == 1.0
    assert "stop/max_tokens" not in trajectory.metrics


class NoFinish:
    """A minimal message env without ``finish``."""

    tools = ()

    async def initial_messages(self):
        return list(PROMPT)

    async def step(self, response: ParsedResponse) -> MessageStepResult:
        return MessageStepResult(messages=[], done=True, reward=1.0)

    async def close(self) -> None:
        pass


async def test_envs_without_finish_end_with_reward_zero(smol):
    trajectory = await run_episode(
        MessageTokenEnv(NoFinish(), smol, max_tokens=5), scripted(smol, [LONG_ANSWER])
    )
    assert trajectory.stop_reason is StopReason.MAX_TOKENS and trajectory.reward == 0.0


async def test_finish_after_the_end_is_a_bug():
    env = AgentToolMessageEnv(initial_messages=PROMPT, tools=[touch], reward_fn=Graded())
    result = await env.finish(StopReason.MAX_TOKENS)
    assert result.done and result.stop_reason is StopReason.MAX_TOKENS and result.reward == 0.0
    with pytest.raises(RuntimeError, match="after the episode ended"):
        await env.finish(StopReason.MAX_TOKENS)
