"""The local teacher (chunked scoring, top-K, positions, batching) and the server teacher's
errors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import free_port
from training.errors import TeacherServerError
from training.teachers import LocalTeacher, VLLMServerTeacher
from training.types import ScoreRequest


def naive_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """[T, V] log-softmax from one full forward pass; row t predicts token t (row 0 unused)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.cat([torch.zeros(1, logits.shape[-1]), torch.log_softmax(logits[:-1], -1)])


@pytest.fixture(scope="module")
def sequences(smollm2_tokenizer) -> list[list[int]]:
    texts = [
        "The teacher scores every token the student sampled.",
        "ls -la /app",
        "def add(a, b):\n    return a + b\n" * 4,
    ]
    return [smollm2_tokenizer.encode(t) for t in texts]


def test_chunked_scores_equal_a_full_forward_pass(tiny_model, sequences):
    chunked = LocalTeacher(tiny_model, chunk_size=3).score_sync(
        [ScoreRequest(s) for s in sequences]
    )
    whole = LocalTeacher(tiny_model, chunk_size=100_000).score_sync(
        [ScoreRequest(s) for s in sequences]
    )
    for tokens, a, b in zip(sequences, chunked, whole, strict=True):
        expected = naive_logprobs(tiny_model, tokens).gather(-1, torch.tensor(tokens)[:, None])
        expected[0] = 0.0
        torch.testing.assert_close(a.logprobs, expected[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_batches_of_mixed_lengths_score_like_single_requests(tiny_model, sequences):
    teacher = LocalTeacher(tiny_model, chunk_size=16)
    together = teacher.score_sync([ScoreRequest(s) for s in sequences])
    for tokens, scores in zip(sequences, together, strict=True):
        alone = teacher.score_sync([ScoreRequest(tokens)])[0]
        torch.testing.assert_close(scores.logprobs, alone.logprobs, atol=1e-5, rtol=0)


def test_top_k_alternatives_are_the_k_most_likely_tokens(tiny_model, sequences):
    tokens = sequences[0]
    scores = LocalTeacher(tiny_model, chunk_size=4).score_sync([ScoreRequest(tokens, top_k=7)])[0]
    expected = naive_logprobs(tiny_model, tokens)[1:].topk(7, dim=-1)
    assert scores.topk_ids.shape == (len(tokens), 7)
    assert torch.equal(scores.topk_ids[1:], expected.indices)
    torch.testing.assert_close(scores.topk_logprobs[1:], expected.values, atol=1e-5, rtol=0)


def test_only_requested_positions_are_scored(tiny_model, sequences):
    tokens = sequences[2]
    wanted = [t % 3 == 0 for t in range(len(tokens))]
    scores = LocalTeacher(tiny_model).score_sync([ScoreRequest(tokens, positions=wanted)])[0]
    expected = naive_logprobs(tiny_model, tokens).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    for t, on in enumerate(wanted):
        if on and t > 0:
            assert scores.logprobs[t] == pytest.approx(expected[t].item(), abs=1e-5)
        else:
            assert scores.logprobs[t] == 0.0
    with pytest.raises(ValueError, match="positions has 2 entries"):
        LocalTeacher(tiny_model).score_sync([ScoreRequest(tokens, positions=[True, False])])


def test_full_logits_only_on_request(tiny_model, sequences):
    tokens = sequences[1]
    teacher = LocalTeacher(tiny_model, chunk_size=2)
    plain, full = teacher.score_sync([ScoreRequest(tokens), ScoreRequest(tokens, full_logits=True)])
    assert plain.full_logits is None
    with torch.no_grad():
        logits = tiny_model(torch.tensor([tokens])).logits[0, :-1].float()
    torch.testing.assert_close(full.full_logits[1:], logits, atol=1e-5, rtol=0)


@pytest.mark.anyio
async def test_async_score_matches_the_blocking_one(tiny_model, sequences):
    teacher = LocalTeacher(tiny_model)
    scores = await teacher.score([ScoreRequest(s) for s in sequences])
    blocking = teacher.score_sync([ScoreRequest(s) for s in sequences])
    for a, b in zip(scores, blocking, strict=True):
        assert torch.equal(a.logprobs, b.logprobs)
    await teacher.close()


@pytest.mark.slow
def test_embedded_teacher_scores_equal_a_full_forward_pass(smollm2, smollm2_tokenizer):
    tokens = smollm2_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "List the files."},
            {"role": "assistant", "content": "Run `ls -la` to see them, hidden ones included."},
        ],
        tokenize=True,
        return_dict=False,
    )
    scores = LocalTeacher(smollm2, chunk_size=16).score_sync([ScoreRequest(tokens, top_k=3)])[0]
    naive = naive_logprobs(smollm2, tokens)
    expected = naive.gather(-1, torch.tensor(tokens)[:, None])[1:, 0]
    torch.testing.assert_close(scores.logprobs[1:], expected, atol=1e-4, rtol=0)
    assert torch.equal(scores.topk_ids[1:], naive[1:].topk(3, dim=-1).indices)


@pytest.mark.anyio
async def test_a_dead_server_is_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    teacher = VLLMServerTeacher(url, "some-model", max_attempts=3, backoff_s=0.01)
    with pytest.raises(TeacherServerError) as error:
        await teacher.score([ScoreRequest([1, 2, 3])])
    message = str(error.value)
    assert f"vLLM teacher at {url} is unreachable after 3 attempts (connection refused)" in message
    assert "scripts/vllm_cpu.py serve" in message and "make vllm-cpu" in message
    assert error.value.kind == "teacher"  # an EnvironmentFailure: the episode is invalid
    await teacher.close()


@pytest.mark.anyio
async def test_a_remote_teacher_refuses_full_logits():
    teacher = VLLMServerTeacher(f"http://127.0.0.1:{free_port()}", "m")
    with pytest.raises(ValueError, match="cannot return full_logits"):
        await teacher.score([ScoreRequest([1, 2], full_logits=True)])
    await teacher.close()
