"""MessageTokenEnv + run_episode over real AgentToolMessageEnv episodes with real tools.

The model is replaced by a script of assistant texts (``Scripted``): mask exactness needs
outputs that call tools on cue, which the embedded SmolLM2 does not do by itself. Everything
else (renderers, tokenizers, the message loop, tools) is the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tool_use import AgentToolMessageEnv, EnvironmentFailure, Message, StopReason, tool
from tool_use.agent_env import ParseErrorPolicy
from tool_use.renderers import get_renderer
from tool_use.renderers.base import to_hf
from tool_use.token_env import MessageTokenEnv, PromptTooLongError, run_episode
from tool_use.trajectory import Trajectory, read_jsonl, write_jsonl
from tool_use.types import MessageStepResult, Observation, ParsedResponse

pytestmark = pytest.mark.anyio

FILES = {"notes.txt": "alpha\nbeta\ngamma\n", "run.sh": "echo hi\n"}


@tool
def ls() -> str:
    """List the files."""
    return "\n".join(sorted(FILES))


@tool
def cat(path: str) -> str:
    """Print a file."""
    return FILES[path]


@tool
def broken_disk() -> str:
    """A tool whose sandbox died."""
    raise EnvironmentFailure("the sandbox stopped answering", kind="sandbox")


PROMPT = [
    Message(role="system", content="You are a shell agent."),
    Message(role="user", content="How many lines does notes.txt have?"),
]

CALL_LS = '<tool_call>\n{"name": "ls", "arguments": {}}\n</tool_call><|im_end|>'
CALL_CAT = (
    'Reading.\n<tool_call>\n{"name": "cat", "arguments": {"path": "notes.txt"}}\n</tool_call>'
    "<|im_end|>"
)
CALL_CAT_BARE = CALL_CAT.removeprefix("Reading.\n")
ANSWER = "It has 3 lines.<|im_end|>"


@dataclass
class Sample:
    tokens: list[int]
    sampling_logprobs: list[float]
    model_logprobs: list[float]
    num_forced: int = 0


@dataclass
class Scripted:
    """Plays the policy: returns the next scripted text as tokens, cut to the turn budget,
    with a distinct logprob per token so their placement can be checked."""

    renderer: object
    texts: list[str]
    contexts: list[list[int]] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    async def __call__(self, context: list[int], observation: Observation) -> Sample:
        self.contexts.append(list(context))
        self.observations.append(observation)
        tokens = self.renderer.encode(self.texts.pop(0))
        forced = 0
        if observation.tool_choice == "required":
            forced = len(observation.forced_prefix)
            assert tokens[:forced] == observation.forced_prefix
        tokens = tokens[: observation.max_tokens]
        base = -0.01 * (len(self.samples) + 1)
        sample = Sample(
            tokens=tokens,
            sampling_logprobs=[0.0] * forced
            + [base - i / 1000 for i in range(len(tokens) - forced)],
            model_logprobs=[-5.0] * forced
            + [base - 1 - i / 1000 for i in range(len(tokens) - forced)],
            num_forced=forced,
        )
        self.samples.append(sample)
        return sample


class Closing(AgentToolMessageEnv):
    closed = 0

    async def close(self) -> None:
        type(self).closed += 1
        await super().close()


def agent(tools=(ls, cat), **kwargs) -> Closing:
    return Closing(initial_messages=PROMPT, tools=list(tools), **{"max_turns": 5, **kwargs})


@pytest.fixture
def smol(chat_tokenizers):
    return get_renderer(None, chat_tokenizers["smollm2"])


def assert_masks_exact(trajectory: Trajectory, samples: list[Sample]) -> None:
    """mask == 1 exactly on the non-forced sampled tokens, logprobs exactly there."""
    expected = [
        [0] * len(seq) for seq in trajectory.sequences
    ]  # built from the turns, then compared
    for turn, sample in zip(trajectory.turns, samples, strict=True):
        seq = trajectory.sequences[turn.sequence]
        assert seq.tokens[turn.sample_start : turn.sample_end] == sample.tokens
        start = turn.sample_start + sample.num_forced
        expected[turn.sequence][start : turn.sample_end] = [1] * (turn.sample_end - start)
        assert (
            seq.sampling_logprobs[start : turn.sample_end]
            == sample.sampling_logprobs[sample.num_forced :]
        )
        assert (
            seq.model_logprobs[start : turn.sample_end]
            == sample.model_logprobs[sample.num_forced :]
        )
    for seq, mask in zip(trajectory.sequences, expected, strict=True):
        assert seq.mask == mask
        assert all(lp == 0.0 for lp, m in zip(seq.sampling_logprobs, mask, strict=True) if not m)
        assert all(lp == 0.0 for lp, m in zip(seq.model_logprobs, mask, strict=True) if not m)


async def test_multi_turn_episode_masks_and_tokens(smol):
    model = Scripted(smol, [CALL_LS, CALL_CAT, ANSWER])
    env = MessageTokenEnv(agent(), smol, max_tokens=64)
    trajectory = await run_episode(env, model)

    assert trajectory.stop_reason is StopReason.NO_TOOL_CALL
    assert trajectory.valid and len(trajectory.sequences) == 1 and len(trajectory.turns) == 3
    assert_masks_exact(trajectory, model.samples)
    assert trajectory.num_sampled_tokens == sum(len(s.tokens) for s in model.samples)
    # The sequence is the whole conversation, tokenised once, in template order.
    roles = [m.role for m in trajectory.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    expected = smol.prompt_text(trajectory.messages, trajectory.tools)
    expected = expected.removesuffix("<|im_start|>assistant\n").removesuffix("\n")
    (sequence,) = trajectory.sequences
    assert sequence.tokens == smol.encode(expected)
    # Each turn the sampler saw exactly the sequence so far; observations after the first are
    # only the new tokens.
    for turn, context in zip(trajectory.turns, model.contexts, strict=True):
        assert context == sequence.tokens[: turn.sample_start]
    assert model.observations[0].tokens == smol.render_prompt(PROMPT, trajectory.tools)
    assert model.observations[1].tokens == smol.encode(
        "\n<|im_start|>user\n<tool_response>\nnotes.txt\nrun.sh\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert all(o.stop_sequences == smol.stop_sequences for o in model.observations)
    assert [t.context_messages for t in trajectory.turns] == [2, 4, 6]
    assert trajectory.metrics["turns"] == 3.0 and trajectory.metrics["stop/no_tool_call"] == 1.0


async def test_forced_prefix_is_context_not_training_signal(smol):
    model = Scripted(smol, [CALL_LS, CALL_CAT_BARE])
    env = MessageTokenEnv(agent(max_tool_calls=2), smol, max_tokens=64, tool_choice="required")
    trajectory = await run_episode(env, model)

    assert trajectory.stop_reason is StopReason.TOOL_BUDGET
    assert all(o.forced_prefix == smol.tool_call_prefix for o in model.observations)
    assert all(o.tool_choice == "required" for o in model.observations)
    assert [s.num_forced for s in model.samples] == [len(smol.tool_call_prefix)] * 2
    assert_masks_exact(trajectory, model.samples)
    for turn in trajectory.turns:
        seq = trajectory.sequences[turn.sequence]
        forced = seq.tokens[turn.sample_start : turn.sample_start + len(smol.tool_call_prefix)]
        assert forced == smol.tool_call_prefix
        assert seq.mask[turn.sample_start : turn.sample_start + len(forced)] == [0] * len(forced)


async def test_a_turn_cut_by_max_tokens_ends_the_episode(smol):
    model = Scripted(smol, [CALL_CAT])
    env = MessageTokenEnv(agent(), smol, max_tokens=5)
    trajectory = await run_episode(env, model)
    assert trajectory.stop_reason is StopReason.MAX_TOKENS
    assert model.observations[0].max_tokens == 5
    assert trajectory.num_sampled_tokens == 5 and len(trajectory.turns) == 1
    assert trajectory.messages[-1].role == "assistant"


async def test_trajectory_budget_clips_the_next_turn_then_overflows(smol):
    prompt = smol.render_prompt(PROMPT, [ls.spec, cat.spec])
    first = smol.encode(CALL_LS)
    continuation = smol.encode(
        "\n<|im_start|>user\n<tool_response>\nnotes.txt\nrun.sh\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    limit = len(prompt) + len(first) + len(continuation) + 6
    model = Scripted(smol, [CALL_LS, CALL_CAT])
    env = MessageTokenEnv(agent(), smol, max_tokens=64, max_trajectory_tokens=limit)
    trajectory = await run_episode(env, model)

    assert [o.max_tokens for o in model.observations] == [len(first) + len(continuation) + 6, 6]
    assert trajectory.stop_reason is StopReason.CONTEXT_OVERFLOW
    assert len(trajectory.sequences[0]) == limit
    assert_masks_exact(trajectory, model.samples)


async def test_env_answer_that_does_not_fit_ends_with_overflow(smol):
    prompt = smol.render_prompt(PROMPT, [ls.spec, cat.spec])
    first = smol.encode(CALL_LS)
    limit = len(prompt) + len(first) + 3  # the tool result cannot fit
    model = Scripted(smol, [CALL_LS])
    env = MessageTokenEnv(agent(), smol, max_tokens=64, max_trajectory_tokens=limit)
    trajectory = await run_episode(env, model)
    assert trajectory.stop_reason is StopReason.CONTEXT_OVERFLOW
    assert len(trajectory.turns) == 1
    assert trajectory.sequences[0].tokens == prompt + first  # nothing half-appended
    assert [m.role for m in trajectory.turns[0].env_messages] == ["tool"]


async def test_prompt_longer_than_the_budget_is_refused_and_env_closed(smol):
    before = Closing.closed
    env = MessageTokenEnv(agent(), smol, max_tokens=8, max_trajectory_tokens=10)
    with pytest.raises(PromptTooLongError, match="max_trajectory_tokens=10"):
        await run_episode(env, Scripted(smol, []))
    assert Closing.closed == before + 1


async def test_qwen3_history_rewrite_starts_a_new_sequence(chat_tokenizers):
    """A malformed call gets a user correction (a new query): Qwen3's template then drops the
    earlier thinking, so the episode continues in a second, fully re-rendered sequence."""
    tokenizer = chat_tokenizers["qwen3"]
    renderer = get_renderer(None, tokenizer)
    bad = (
        "<think>\nI will list.\n</think>\n\n"
        '<tool_call>\n{"name": "ls", "arguments": {}\n</tool_call><|im_end|>'
    )
    good = "<think>\nRetry.\n</think>\n\n" + CALL_CAT
    final = "<think>\nThree lines.\n</think>\n\n" + ANSWER
    model = Scripted(renderer, [bad, good, final])
    message_env = agent(parse_error_policy=ParseErrorPolicy.RETRY)
    trajectory = await run_episode(MessageTokenEnv(message_env, renderer, max_tokens=64), model)

    assert trajectory.stop_reason is StopReason.NO_TOOL_CALL
    assert [o.new_sequence for o in model.observations] == [False, True, False]
    assert [t.sequence for t in trajectory.turns] == [0, 1, 1]
    assert trajectory.metrics["sequences"] == 2.0
    assert_masks_exact(trajectory, model.samples)
    first, second = trajectory.sequences
    assert first.tokens == model.observations[0].tokens + model.samples[0].tokens
    # The second sequence opens with the template's own render of the history so far.
    history = trajectory.messages[: trajectory.turns[1].context_messages]
    assert history[-1].role == "user" and "could not be read" in history[-1].content
    expected = tokenizer.apply_chat_template(
        to_hf(history),
        tools=[{"type": "function", "function": t} for t in trajectory.tools],
        add_generation_prompt=True,
    )["input_ids"]
    assert second.tokens[: trajectory.turns[1].sample_start] == expected
    assert "I will list." not in renderer.decode(second.tokens)


async def test_tool_environment_failure_marks_the_episode_invalid(smol):
    before = Closing.closed
    model = Scripted(
        smol, ['<tool_call>\n{"name": "broken_disk", "arguments": {}}\n</tool_call><|im_end|>']
    )
    trajectory = await run_episode(MessageTokenEnv(agent(tools=[broken_disk]), smol), model)
    assert not trajectory.valid
    assert trajectory.failure == "sandbox: the sandbox stopped answering"
    assert trajectory.stop_reason is StopReason.ENV_FAILURE
    assert Closing.closed == before + 1


class RaisingEnv:
    """A message env whose infrastructure raises out of step (no loop to catch it)."""

    closed = False
    tools = ()

    async def initial_messages(self) -> list[Message]:
        return list(PROMPT)

    async def step(self, response: ParsedResponse) -> MessageStepResult:
        raise EnvironmentFailure("grader crashed", kind="grading")

    async def close(self) -> None:
        self.closed = True


async def test_failure_raised_by_the_env_is_recorded_and_env_closed(smol):
    env = RaisingEnv()
    trajectory = await run_episode(MessageTokenEnv(env, smol), Scripted(smol, [ANSWER]))
    assert trajectory.failure == "grading: grader crashed"
    assert trajectory.metrics["failure/grading"] == 1.0
    assert env.closed


async def test_teacher_messages_and_metadata_come_from_the_message_env(smol):
    privileged = [*PROMPT, Message(role="user", content="Solution: cat notes.txt | wc -l")]
    message_env = agent(teacher_messages=privileged, metadata={"task": "count-lines"})
    trajectory = await run_episode(MessageTokenEnv(message_env, smol), Scripted(smol, [ANSWER]))
    assert trajectory.teacher_messages == privileged
    assert trajectory.metadata == {"task": "count-lines"}
    assert [t["name"] for t in trajectory.tools] == ["ls", "cat"]


async def test_trajectory_jsonl_round_trip(smol, tmp_path):
    model = Scripted(smol, [CALL_LS, CALL_CAT, ANSWER])
    message_env = agent(teacher_messages=PROMPT[:1], metadata={"task": "t"})
    trajectory = await run_episode(MessageTokenEnv(message_env, smol), model)
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(path, [trajectory, trajectory])
    back = list(read_jsonl(path))
    assert back == [trajectory, trajectory]
    assert back[0].turns[1].message.tool_calls[0].name == "cat"
    (tmp_path / "bad.jsonl").write_text('{"sequences": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a trajectory record"):
        list(read_jsonl(tmp_path / "bad.jsonl"))


async def test_bad_arguments_are_named(smol):
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        MessageTokenEnv(agent(), smol, max_tokens=0)
    with pytest.raises(ValueError, match="tool_choice must be"):
        MessageTokenEnv(agent(), smol, tool_choice="always")


@pytest.mark.slow
async def test_real_smollm2_episode_with_required_tool_calls(smollm2, smollm2_tokenizer):
    """The embedded model through the real HF sampler: forced envelope, free arguments, and
    masks/logprobs that land exactly on what the model sampled."""
    from training.samplers.hf import HFSampler
    from training.types import SamplingParams

    renderer = get_renderer(None, smollm2_tokenizer)
    sampler = HFSampler(smollm2, smollm2_tokenizer, seed=0)
    samples = []

    async def sample(context: list[int], observation: Observation):
        params = SamplingParams(
            max_tokens=observation.max_tokens,
            temperature=1.0,
            stop_sequences=tuple(tuple(s) for s in observation.stop_sequences),
            tool_choice=observation.tool_choice,
            forced_prefix=tuple(observation.forced_prefix),
        )
        samples.append(await sampler.sample(context, params))
        return samples[-1]

    message_env = agent(max_turns=2, parse_error_policy=ParseErrorPolicy.RETRY)
    env = MessageTokenEnv(message_env, renderer, max_tokens=32, tool_choice="required")
    trajectory = await run_episode(env, sample)

    assert trajectory.valid and trajectory.stop_reason is not None
    assert all(s.num_forced == len(renderer.tool_call_prefix) for s in samples)
    assert all(s.tokens[: s.num_forced] == renderer.tool_call_prefix for s in samples)
    assert_masks_exact(trajectory, samples)
    assert trajectory.num_sampled_tokens == sum(len(s.tokens) - s.num_forced for s in samples)
    for seq in trajectory.sequences:
        assert all(lp < 0 for lp, m in zip(seq.model_logprobs, seq.mask, strict=True) if m)
    for turn in trajectory.turns:
        assert turn.message is not None and turn.message.role == "assistant"
