"""teacher_views: every student token scored exactly once, under the teacher's own context.

Episodes are real AgentToolMessageEnv runs with real tools; the student is a script of
assistant texts (see tests/tool_use/test_token_env.py for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer

from tool_use import AgentToolMessageEnv, Message, tool
from tool_use.agent_env import ParseErrorPolicy
from tool_use.renderers import HermesRenderer, Llama3Renderer, Qwen3Renderer
from tool_use.token_env import MessageTokenEnv, run_episode
from tool_use.trajectory import Trajectory
from tool_use.types import Observation, StepResult
from training.teacher_view import TeacherView, teacher_views

pytestmark = pytest.mark.anyio

PROMPT = [
    Message(role="system", content="You are a shell agent."),
    Message(role="user", content="Print notes.txt."),
]
PRIVILEGED = [
    Message(role="system", content="You are a shell agent. The answer is `cat notes.txt`."),
    Message(role="user", content="Print notes.txt. (Reference: cat notes.txt)"),
]
CALL = '<tool_call>\n{"name": "cat", "arguments": {"path": "notes.txt"}}\n</tool_call><|im_end|>'
BAD = '<tool_call>\n{"name": "cat", "arguments": \n</tool_call><|im_end|>'
ANSWER = "It says hello.<|im_end|>"


@tool
def cat(path: str) -> str:
    """Print a file."""
    return "hello\nworld" if path == "notes.txt" else f"no such file: {path}"


@dataclass
class Sample:
    tokens: list[int]
    sampling_logprobs: list[float]
    model_logprobs: list[float]
    num_forced: int = 0


def scripted(renderer, texts: list[str]):
    async def sample(context: list[int], observation: Observation) -> Sample:
        tokens = renderer.encode(texts.pop(0))
        forced = len(observation.forced_prefix) if observation.tool_choice == "required" else 0
        logprobs = [0.0] * forced + [-0.5] * (len(tokens) - forced)
        return Sample(tokens, logprobs, logprobs, forced)

    return sample


async def episode(
    renderer, texts, *, teacher_messages=None, tool_choice="auto", **env_options
) -> Trajectory:
    message_env = AgentToolMessageEnv(
        initial_messages=PROMPT,
        tools=[cat],
        teacher_messages=teacher_messages,
        parse_error_policy=ParseErrorPolicy.RETRY,
        **env_options,
    )
    env = MessageTokenEnv(message_env, renderer, max_tokens=64, tool_choice=tool_choice)
    return await run_episode(env, scripted(renderer, list(texts)))


def assert_scores_each_student_token_once(trajectory: Trajectory, views: list[TeacherView]):
    assert len(views) == len(trajectory.sequences)
    for seq, view in zip(trajectory.sequences, views, strict=True):
        assert len(view.positions) == len(seq)
        scored = [p for p in view.positions if p >= 0]
        assert len(scored) == len(set(scored)) == sum(seq.mask)
        for p, m in enumerate(seq.mask):
            assert (view.positions[p] >= 0) == bool(m)
            if m:
                assert view.tokens[view.positions[p]] == seq.tokens[p]
        request = view.score_request(top_k=3)
        assert request.top_k == 3 and sum(request.positions) == sum(seq.mask)
        assert all(request.positions[p] for p in scored)


@pytest.fixture(scope="module")
def llama_tokenizer(embedded_model_dir):
    """SmolLM2's vocabulary plus Llama 3's special tokens: a teacher with another template."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
            ]
        }
    )
    tokenizer.bos_token = "<|begin_of_text|>"
    return tokenizer


async def test_same_renderer_without_privileged_prompt_is_the_identity(smollm2_tokenizer):
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [CALL, ANSWER])

    def no_rendering(*args, **kwargs):
        raise AssertionError("the identity view must not re-render")

    same = HermesRenderer(smollm2_tokenizer)
    same.render_prompt = same.render_continuation = no_rendering
    assert same.same_rendering_as(student)
    for views in (
        teacher_views(trajectory),
        teacher_views(trajectory, same, student_renderer=student),
    ):
        (view,) = views
        assert view.tokens == trajectory.sequences[0].tokens
        assert view.positions == [
            i if m else -1 for i, m in enumerate(trajectory.sequences[0].mask)
        ]
        assert_scores_each_student_token_once(trajectory, views)


async def test_privileged_prompt_shifts_every_position_by_the_prompt_difference(smollm2_tokenizer):
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [CALL, ANSWER], teacher_messages=PRIVILEGED)
    (view,) = teacher_views(trajectory, student, student_renderer=student)
    assert_scores_each_student_token_once(trajectory, [view])

    plain = student.render_prompt(PROMPT, trajectory.tools)
    privileged = student.render_prompt(PRIVILEGED, trajectory.tools)
    seq = trajectory.sequences[0]
    assert view.tokens[: len(privileged)] == privileged
    assert view.tokens[len(privileged) :] == seq.tokens[len(plain) :]
    shift = len(privileged) - len(plain)
    assert shift > 0
    assert all(view.positions[p] == p + shift for p, m in enumerate(seq.mask) if m)


async def test_teacher_with_another_template(smollm2_tokenizer, llama_tokenizer):
    """A Llama-3-format teacher: its own headers and tool turns, the student's tokens verbatim."""
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [CALL, ANSWER])
    teacher = Llama3Renderer(llama_tokenizer)
    (view,) = teacher_views(trajectory, teacher, student_renderer=student)
    assert_scores_each_student_token_once(trajectory, [view])

    first, second = trajectory.turns
    seq = trajectory.sequences[0]
    expected = teacher.render_prompt(PROMPT, trajectory.tools)
    expected += seq.tokens[first.sample_start : first.sample_end]
    expected += teacher.render_continuation(
        trajectory.messages[:3], trajectory.messages[3:4], trajectory.tools
    )
    expected += seq.tokens[second.sample_start : second.sample_end]
    assert view.tokens == expected
    text = teacher.decode(view.tokens)
    assert text.count("<|start_header_id|>ipython<|end_header_id|>") == 1
    assert '"hello\\nworld"' in text  # Llama's template JSON-encodes tool results


async def test_multi_sequence_episode_with_privileged_prompt(smollm2_tokenizer):
    """A Qwen3 student splits the episode at the user correction; the teacher (ChatML, with
    privileged context) gets one view per sequence, each opening with its own prompt."""
    student = Qwen3Renderer(smollm2_tokenizer)
    texts = ["<think>\nTry.\n</think>\n\n" + BAD, "<think>\nAgain.\n</think>\n\n" + CALL, ANSWER]
    trajectory = await episode(student, texts, teacher_messages=PRIVILEGED)
    assert len(trajectory.sequences) == 2

    teacher = HermesRenderer(smollm2_tokenizer)
    views = teacher_views(trajectory, teacher, student_renderer=student)
    assert_scores_each_student_token_once(trajectory, views)
    second_turn = trajectory.turns[1]
    history = [*PRIVILEGED, *trajectory.messages[2 : second_turn.context_messages]]
    opening = teacher.render_prompt(history, trajectory.tools)
    assert views[1].tokens[: len(opening)] == opening
    assert "Reference: cat notes.txt" in teacher.decode(views[0].tokens)
    assert "Reference: cat notes.txt" in teacher.decode(views[1].tokens)


async def test_forced_prefix_is_context_for_the_teacher_but_not_scored(smollm2_tokenizer):
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [CALL, CALL], tool_choice="required", max_tool_calls=2)
    (view,) = teacher_views(trajectory, HermesRenderer(smollm2_tokenizer, "Teach."))
    assert_scores_each_student_token_once(trajectory, [view])
    prefix = student.tool_call_prefix
    for turn in trajectory.turns:
        seq = trajectory.sequences[turn.sequence]
        assert seq.mask[turn.sample_start : turn.sample_start + len(prefix)] == [0] * len(prefix)
    assert view.tokens.count(prefix[0]) >= 2  # the forced envelope is in the teacher's context


async def test_to_student_gathers_teacher_scores(smollm2_tokenizer):
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [CALL, ANSWER], teacher_messages=PRIVILEGED)
    (view,) = teacher_views(trajectory, student)
    scores = torch.arange(len(view.tokens), dtype=torch.float32)
    aligned = view.to_student(scores)
    expected = [float(p) if p >= 0 else 0.0 for p in view.positions]
    assert aligned.tolist() == expected
    topk = torch.stack([scores, -scores], dim=-1)  # [T, K]
    assert view.to_student(topk)[:, 1].tolist() == [-v for v in expected]


async def test_privileged_prompt_needs_a_renderer_and_invalid_episodes_are_refused(
    smollm2_tokenizer,
):
    student = HermesRenderer(smollm2_tokenizer)
    trajectory = await episode(student, [ANSWER], teacher_messages=PRIVILEGED)
    with pytest.raises(ValueError, match="pass the teacher's renderer"):
        teacher_views(trajectory)
    trajectory.failure = "sandbox: died"
    with pytest.raises(ValueError, match="the episode is invalid"):
        teacher_views(trajectory, student)


class TokenLevelEnv:
    """A hand-written token env: its own prompt and env tokens, no messages; ``new_sequence``
    on the second turn when ``fresh`` (a rewritten context)."""

    def __init__(self, teacher_messages=None, fresh: bool = False) -> None:
        self.teacher_messages, self.fresh, self.turns = teacher_messages, fresh, 0

    async def initial_observation(self) -> Observation:
        return Observation(tokens=[11, 12, 13])

    async def step(self, sampled) -> StepResult:
        self.turns += 1
        if self.turns == 2:
            return StepResult(done=True, next_observation=None, reward=1.0)
        tokens = [31, 32, 33] if self.fresh else [21, 22]
        observation = Observation(tokens=tokens, new_sequence=self.fresh)
        return StepResult(done=False, next_observation=observation)

    async def close(self) -> None:
        pass


async def fixed_sample(context: list[int], observation: Observation) -> Sample:
    return Sample([40, 41], [-0.5, -0.5], [-0.5, -0.5])


async def test_a_token_level_env_is_read_verbatim_by_a_teacher_with_another_template(
    smollm2_tokenizer, llama_tokenizer
):
    """Nothing to re-render from: the teacher reads the env's own tokens, prompt included."""
    trajectory = await run_episode(TokenLevelEnv(), fixed_sample)
    (sequence,) = trajectory.sequences
    student, teacher = HermesRenderer(smollm2_tokenizer), Llama3Renderer(llama_tokenizer)
    (view,) = teacher_views(trajectory, teacher, student_renderer=student)
    assert view.tokens == sequence.tokens == [11, 12, 13, 40, 41, 21, 22, 40, 41]
    assert view.positions == [-1, -1, -1, 3, 4, -1, -1, 7, 8]


async def test_a_token_level_envs_privileged_prompt_replaces_only_its_prompt(smollm2_tokenizer):
    renderer = HermesRenderer(smollm2_tokenizer)
    trajectory = await run_episode(TokenLevelEnv(teacher_messages=PRIVILEGED), fixed_sample)
    (view,) = teacher_views(trajectory, renderer, student_renderer=renderer)
    prompt = renderer.render_prompt(PRIVILEGED, [])
    assert view.tokens == [*prompt, 40, 41, 21, 22, 40, 41]
    assert_scores_each_student_token_once(trajectory, [view])

    split = await run_episode(TokenLevelEnv(teacher_messages=PRIVILEGED, fresh=True), fixed_sample)
    with pytest.raises(ValueError, match="must keep its episode in one sequence"):
        teacher_views(split, renderer, student_renderer=renderer)
