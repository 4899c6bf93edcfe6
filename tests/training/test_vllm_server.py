"""Against a real vLLM server on this CPU: the server teacher agrees with the local one, the
server sampler returns tokens and logprobs that match the local model, LoRA adapters load at
run time, and server-side rejections name the URL."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import SERVED_NAME, served_models
from training import models
from training.errors import TeacherServerError
from training.samplers.vllm import VLLMServerSampler
from training.teachers import LocalTeacher, VLLMServerTeacher
from training.types import SamplingParams, ScoreRequest

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.anyio]

IM_END = 2


@pytest.fixture(scope="module")
def episode(smollm2_tokenizer) -> list[int]:
    """A multi-turn tool-use episode rendered with SmolLM2's ChatML template."""
    messages = [
        {"role": "system", "content": "You are a careful agent with a bash tool."},
        {"role": "user", "content": "How many lines does /app/data.csv have?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "bash", "arguments": {"command": '
            '"wc -l /app/data.csv"}}\n</tool_call>',
        },
        {"role": "user", "content": "<tool_response>\n42 /app/data.csv\n</tool_response>"},
        {"role": "assistant", "content": "The file /app/data.csv has 42 lines."},
    ]
    return smollm2_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


async def test_server_teacher_agrees_with_the_local_teacher(vllm_server, smollm2, episode):
    requests = [ScoreRequest(episode, top_k=5), ScoreRequest(episode[:40])]
    local = LocalTeacher(smollm2).score_sync(requests)
    # One request at a time: this server has --enable-lora, and vLLM 0.32 crashes on
    # prompt_logprobs requests that share a batch there (docs/models.md, "Known vLLM bug").
    teacher = VLLMServerTeacher(vllm_server, SERVED_NAME, max_concurrency=1)
    try:
        remote = await teacher.score(requests)
    finally:
        await teacher.close()
    for a, b in zip(local, remote, strict=True):
        gap = (a.logprobs - b.logprobs).abs()[1:]
        # The server computes in bf16, the local model in fp32.
        assert gap.mean().item() <= 0.1, f"mean |local - server| = {gap.mean():.3f} nats/token"
        assert gap.max().item() <= 1.0
    # Top-K: same most-likely token nearly everywhere, close logprobs where ids agree.
    same_top1 = (local[0].topk_ids[1:, 0] == remote[0].topk_ids[1:, 0]).float().mean()
    assert same_top1 >= 0.9
    agree = local[0].topk_ids[1:, 0] == remote[0].topk_ids[1:, 0]
    top1_gap = (local[0].topk_logprobs[1:, 0] - remote[0].topk_logprobs[1:, 0]).abs()[agree]
    assert top1_gap.mean() <= 0.1
    assert torch.all(remote[0].topk_logprobs[1:, :-1] >= remote[0].topk_logprobs[1:, 1:])


async def test_server_sampler_returns_tokens_with_the_models_logprobs(
    vllm_server, smollm2, smollm2_tokenizer
):
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    sampler = VLLMServerSampler(vllm_server, SERVED_NAME, tokenizer=smollm2_tokenizer, seed=0)
    params = SamplingParams(max_tokens=40, stop_sequences=((IM_END,),))
    try:
        outs = [await sampler.sample(prompt, params) for _ in range(2)]
        envelope = tuple(smollm2_tokenizer.encode("<tool_call>"))
        forced = await sampler.sample(
            prompt,
            SamplingParams(
                max_tokens=20, tool_choice="required", forced_prefix=envelope, temperature=0.0
            ),
        )
    finally:
        await sampler.close()
    local = LocalTeacher(smollm2)
    for out in outs:
        assert out.tokens and len(out.tokens) == len(out.model_logprobs)
        assert out.finish_reason == "length" or out.tokens[-1] == IM_END
        assert IM_END not in out.tokens[:-1]
        scores = local.score_sync([ScoreRequest(prompt + out.tokens)])[0]
        gap = (scores.logprobs[len(prompt) :] - torch.tensor(out.model_logprobs)).abs()
        assert gap.mean() <= 0.1
        assert out.sampling_logprobs == out.model_logprobs  # temperature 1, no filters
    # A multi-token stop sequence ends the turn right after it, and is kept.
    stop = tuple(forced.tokens[len(envelope) + 2 : len(envelope) + 4])
    sampler = VLLMServerSampler(vllm_server, SERVED_NAME, tokenizer=smollm2_tokenizer)
    try:
        cut = await sampler.sample(
            prompt + list(envelope),
            SamplingParams(max_tokens=20, temperature=0.0, stop_sequences=(stop,)),
        )
    finally:
        await sampler.close()
    free = forced.tokens[len(envelope) :]
    end = next(i + 2 for i in range(len(free)) if tuple(free[i : i + 2]) == stop)
    assert cut.tokens == free[:end] and cut.finish_reason == "stop"
    assert forced.num_forced == len(envelope) and tuple(forced.tokens[: len(envelope)]) == envelope
    assert forced.sampling_logprobs[: len(envelope)] == [0.0] * len(envelope)
    expected = local.score_sync([ScoreRequest(prompt + forced.tokens)])[0].logprobs
    gap = (expected[len(prompt) :] - torch.tensor(forced.model_logprobs)).abs()
    assert gap.mean() <= 0.1


async def test_lora_adapter_updates_reach_the_server(vllm_server, smollm2, episode, tmp_path):
    student = models.add_lora(copy.deepcopy(smollm2), models.LoraSettings(rank=8))
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    student.eval()
    sampler = VLLMServerSampler(vllm_server, SERVED_NAME, adapter_dir=tmp_path)
    try:
        await sampler.update_weights(student)
        await sampler.update_weights(student)  # a second version replaces the first
        name = sampler.model_name
        assert name.startswith(f"{SERVED_NAME}-lora-") and name.endswith("-v2")
        assert served_models(vllm_server) == {SERVED_NAME, name}  # v1 was unloaded
        assert not (tmp_path / "v1").exists() and (tmp_path / "v2").is_dir()
        teacher = VLLMServerTeacher(vllm_server, name)
        remote = (await teacher.score([ScoreRequest(episode)]))[0].logprobs
        await teacher.close()
    finally:
        await sampler.close()
    assert served_models(vllm_server) == {SERVED_NAME}  # close unloaded the last adapter
    assert tmp_path.is_dir() and not (tmp_path / "v2").exists()  # a given adapter_dir stays
    adapted = LocalTeacher(student).score_sync([ScoreRequest(episode)])[0].logprobs
    base = LocalTeacher(smollm2).score_sync([ScoreRequest(episode)])[0].logprobs
    assert (adapted - base).abs()[1:].mean() > 0.3  # the adapter really changes the model
    assert (adapted - remote).abs()[1:].mean() <= 0.1  # and the server serves that change


async def test_a_rejected_request_names_the_server(vllm_server):
    teacher = VLLMServerTeacher(vllm_server, SERVED_NAME)
    try:
        with pytest.raises(TeacherServerError, match=rf"vLLM teacher at {vllm_server} rejected"):
            await teacher.score([ScoreRequest(list(range(100, 3100)))])  # > max_model_len
    finally:
        await teacher.close()
