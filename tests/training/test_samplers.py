"""The HF sampler: logprobs equal a teacher-forced pass, batching, stops, budgets, tool_choice."""

from __future__ import annotations

import copy
import math

import anyio
import pytest
import torch

from training import models
from training.samplers import HFSampler
from training.samplers.hf import _draw
from training.samplers.merged import MergedLoRA
from training.types import SampledTokens, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    texts = ["Hello there, how are", "a", "The quick brown fox jumps over the lazy dog and then"]
    return [smollm2_tokenizer.encode(t) for t in texts]


def forced_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] logits predicting each sampled token, from one teacher-forced pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    return logits[len(prompt) - 1 : -1]


def teacher_forced_logprobs(model, prompt, tokens) -> torch.Tensor:
    logprobs = torch.log_softmax(forced_logits(model, prompt, tokens), dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def assert_close(values: list[float], expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(torch.tensor(values), expected, atol=atol, rtol=0)


def test_model_logprobs_equal_a_teacher_forced_pass(tiny_model, prompts):
    sampler = HFSampler(tiny_model, seed=1)
    params = SamplingParams(max_tokens=16, temperature=1.0)
    for prompt, out in zip(prompts, sampler.generate(prompts, [params] * 3), strict=True):
        assert len(out.tokens) == 16 and out.finish_reason == "length"
        expected = teacher_forced_logprobs(tiny_model, prompt, out.tokens)
        assert_close(out.model_logprobs, expected)
        # temperature 1 without filters: the sampling distribution is the model's own
        assert_close(out.sampling_logprobs, expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=16, temperature=0.7, top_k=5),
        SamplingParams(max_tokens=16, temperature=1.3, top_p=0.8),
        SamplingParams(max_tokens=16, temperature=0.5, top_k=50, top_p=0.9),
    ],
    ids=["top_k", "top_p", "both"],
)
def test_sampling_logprobs_follow_temperature_and_filters(tiny_model, prompts, params):
    sampler = HFSampler(tiny_model, seed=2)
    for prompt, out in zip(prompts, sampler.generate(prompts, [params] * 3), strict=True):
        logits = forced_logits(tiny_model, prompt, out.tokens) / params.temperature
        if params.top_k:
            kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if params.top_p < 1:
            probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
            drop = (probs.cumsum(-1) - probs) >= params.top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.tokens)[:, None])
        assert_close(out.sampling_logprobs, expected[:, 0])
        assert all(math.isfinite(v) for v in out.sampling_logprobs)  # only kept tokens drawn
        assert_close(out.model_logprobs, teacher_forced_logprobs(tiny_model, prompt, out.tokens))


@pytest.mark.anyio
async def test_concurrent_calls_are_batched_and_match_one_by_one(tiny_model, prompts):
    sampler = HFSampler(tiny_model, batch_window_s=5.0)
    alone = [sampler.generate([p], [GREEDY])[0] for p in prompts]
    sampler.stats["admissions"] = 0
    results: list[SampledTokens | None] = [None] * len(prompts)

    async def episode(i: int) -> None:
        async with sampler.track_episode():
            results[i] = await sampler.sample(prompts[i], GREEDY)

    async with anyio.create_task_group() as group:
        for i in range(len(prompts)):
            group.start_soon(episode, i)
    # Every tracked episode was waiting, so the batch left long before the 5 s window.
    assert sampler.stats["admissions"] == 1
    for one, batched in zip(alone, results, strict=True):
        assert batched.tokens == one.tokens
        assert_close(batched.model_logprobs, torch.tensor(one.model_logprobs))


@pytest.mark.anyio
async def test_rows_leave_early_and_new_requests_join_the_running_batch(tiny_model, prompts):
    sampler = HFSampler(tiny_model, eos_token_ids=(), batch_window_s=0.0)
    short = SamplingParams(max_tokens=2, temperature=0.0)
    long = SamplingParams(max_tokens=150, temperature=0.0)
    late = SamplingParams(max_tokens=20, temperature=0.0)
    alone = {
        "long": sampler.generate([prompts[2]], [long])[0],
        "late": sampler.generate([prompts[0] * 5], [late])[0],
    }
    sampler.stats["admissions"] = 0
    finished: list[str] = []
    results: dict[str, SampledTokens] = {}

    async def run(name: str, prompt: list[int], params: SamplingParams) -> None:
        results[name] = await sampler.sample(prompt, params)
        finished.append(name)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "long", prompts[2], long)
        await run("short", prompts[1], short)  # returns while "long" still decodes
        assert finished == ["short"]
        # A longer prompt joins mid-decode: the running cache is left-padded to its width.
        await run("late", prompts[0] * 5, late)
        assert finished == ["short", "late"]
    assert finished == ["short", "late", "long"]
    assert sampler.stats["admissions"] >= 2
    for name in ("long", "late"):
        assert results[name].tokens == alone[name].tokens
        assert_close(results[name].model_logprobs, torch.tensor(alone[name].model_logprobs))


@pytest.mark.anyio
async def test_a_failing_batch_raises_in_every_caller_and_the_sampler_recovers(tiny_model, prompts):
    sampler = HFSampler(tiny_model)
    with pytest.raises(IndexError):
        await sampler.sample([1, 10**9], GREEDY)  # an id beyond the embedding table
    out = await sampler.sample(prompts[0], GREEDY)
    assert out.tokens == sampler.generate([prompts[0]], [GREEDY])[0].tokens


def test_prompts_of_very_different_lengths_decode_as_if_alone(tiny_model, smollm2_tokenizer):
    # Far apart lengths are prefilled in separate groups whose caches are then merged.
    long_prompt = smollm2_tokenizer.encode("word " * 300)
    short = [1, 2, 3]
    sampler = HFSampler(tiny_model)
    together = sampler.generate([long_prompt, short], [GREEDY, GREEDY])
    assert together[0].tokens == sampler.generate([long_prompt], [GREEDY])[0].tokens
    assert together[1].tokens == sampler.generate([short], [GREEDY])[0].tokens


def test_stop_sequence_ends_the_turn_and_is_kept(tiny_model, prompts):
    sampler = HFSampler(tiny_model, eos_token_ids=())
    free = sampler.generate([prompts[0]], [GREEDY])[0].tokens
    stop = tuple(free[5:7])
    first = next(i for i in range(len(free) - 1) if tuple(free[i : i + 2]) == stop)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_sequences=((99999,), stop))
    out = sampler.generate([prompts[0]], [params])[0]
    assert out.tokens == free[: first + 2]
    assert out.finish_reason == "stop"


def test_eos_ends_the_turn(tiny_model, prompts):
    free = HFSampler(tiny_model, eos_token_ids=()).generate([prompts[0]], [GREEDY])[0].tokens
    out = HFSampler(tiny_model, eos_token_ids=[free[3]]).generate([prompts[0]], [GREEDY])[0]
    assert out.tokens == free[: free.index(free[3]) + 1]
    assert out.finish_reason == "stop"


def test_given_stop_sequences_alone_end_the_turn(tiny_model, prompts):
    """The env decides what ends a turn: a model EOS id outside its stop sequences does not."""
    free = HFSampler(tiny_model, eos_token_ids=()).generate([prompts[0]], [GREEDY])[0].tokens
    eos = free[1]
    end = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    sampler = HFSampler(tiny_model, eos_token_ids=[eos])
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_sequences=((free[end],),))
    out = sampler.generate([prompts[0]], [params])[0]
    assert out.tokens == free[: end + 1] and out.finish_reason == "stop"  # went past eos
    without = SamplingParams(max_tokens=12, temperature=0.0)
    assert sampler.generate([prompts[0]], [without])[0].tokens == free[: free.index(eos) + 1]


def test_max_tokens_is_a_hard_budget(tiny_model, prompts):
    sampler = HFSampler(tiny_model, eos_token_ids=())
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (1, 4, 9)]
    outs = sampler.generate(prompts, params)
    assert [len(o.tokens) for o in outs] == [1, 4, 9]
    assert all(o.finish_reason == "length" for o in outs)


def test_tool_choice_required_forces_the_envelope_then_samples_freely(tiny_model, prompts):
    envelope = (44, 19324, 79, 4350, 46)  # "<tool_call>" in SmolLM2's tokenizer
    sampler = HFSampler(tiny_model, eos_token_ids=())
    params = SamplingParams(
        max_tokens=12, temperature=0.0, tool_choice="required", forced_prefix=envelope
    )
    out = sampler.generate([prompts[0]], [params])[0]
    assert out.num_forced == 5 and tuple(out.tokens[:5]) == envelope
    assert out.sampling_logprobs[:5] == [0.0] * 5
    assert_close(out.model_logprobs, teacher_forced_logprobs(tiny_model, prompts[0], out.tokens))
    # After the envelope the model continues exactly as if the envelope were in the prompt.
    free = sampler.generate([prompts[0] + list(envelope)], [GREEDY])[0]
    assert out.tokens[5:] == free.tokens[:7]


def test_tool_choice_none_never_opens_the_envelope(tiny_model, prompts):
    sampler = HFSampler(tiny_model, eos_token_ids=())
    free = sampler.generate([prompts[1]], [GREEDY])[0].tokens
    # A two-token envelope that greedy decoding would open right away is steered around...
    two = SamplingParams(
        max_tokens=12, temperature=0.0, tool_choice="none", forced_prefix=tuple(free[:2])
    )
    out = sampler.generate([prompts[1]], [two])[0]
    assert out.tokens[0] == free[0] and out.tokens[1] != free[1]
    # ...and a one-token envelope is never sampled, even at high temperature.
    one = SamplingParams(
        max_tokens=64, temperature=2.0, tool_choice="none", forced_prefix=(free[0],)
    )
    for result in sampler.generate([prompts[1]] * 4, [one] * 4):
        assert free[0] not in result.tokens


def test_tool_choice_needs_the_envelope(tiny_model, prompts):
    with pytest.raises(ValueError, match="forced_prefix"):
        HFSampler(tiny_model).generate([prompts[0]], [SamplingParams(tool_choice="required")])


def test_samples_come_from_the_current_weights_and_train_mode_is_restored(make_tiny_model, prompts):
    model = make_tiny_model(seed=3)
    model.train()
    sampler = HFSampler(model)
    before = sampler.generate([prompts[0]], [GREEDY])[0]
    assert model.training
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-1.5)
    anyio.run(sampler.update_weights, model)
    after = sampler.generate([prompts[0]], [GREEDY])[0]
    assert after.tokens != before.tokens
    model.eval()
    assert_close(after.model_logprobs, teacher_forced_logprobs(model, prompts[0], after.tokens))


def test_a_lora_model_samples_through_peft(make_tiny_model, prompts, tmp_path):
    base = make_tiny_model(seed=4)
    model = models.add_lora(copy.deepcopy(base), models.LoraSettings(rank=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    out = HFSampler(model).generate([prompts[2]], [GREEDY])[0]
    model.eval()
    assert_close(out.model_logprobs, teacher_forced_logprobs(model, prompts[2], out.tokens))
    plain = HFSampler(base).generate([prompts[2]], [GREEDY])[0]
    assert plain.model_logprobs != out.model_logprobs


@pytest.mark.slow
def test_embedded_model_logprobs_equal_a_teacher_forced_pass(smollm2, smollm2_tokenizer):
    prompt = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    params = SamplingParams(max_tokens=24, temperature=0.8, stop_sequences=((2,),))
    out = HFSampler(smollm2, smollm2_tokenizer, seed=0).generate([prompt, prompt], [params] * 2)
    for result in out:
        assert_close(result.model_logprobs, teacher_forced_logprobs(smollm2, prompt, result.tokens))
        assert result.finish_reason == "stop" or len(result.tokens) == 24


@pytest.mark.anyio
async def test_a_cancelled_caller_hands_the_batch_to_the_others(tiny_model, prompts):
    sampler = HFSampler(tiny_model, eos_token_ids=(), batch_window_s=0.0)
    long = SamplingParams(max_tokens=60, temperature=0.0)
    alone = sampler.generate([prompts[1]], [long])[0]
    results: dict[str, SampledTokens] = {}

    async def cancelled() -> None:
        with anyio.move_on_after(0.05):  # cancelled while it drives the batch
            await sampler.sample(prompts[0], SamplingParams(max_tokens=500, temperature=0.0))
        results["cancelled"] = None  # type: ignore[assignment]

    async def survivor() -> None:
        results["survivor"] = await sampler.sample(prompts[1], long)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            group.start_soon(cancelled)
            group.start_soon(survivor)
    assert results["cancelled"] is None
    assert results["survivor"].tokens == alone.tokens
    assert sampler._batch is None or not sampler._batch.rows  # the abandoned row was dropped


def test_a_lora_model_decodes_from_a_merged_copy_that_follows_its_updates(make_tiny_model, prompts):
    model = models.add_lora(make_tiny_model(seed=5), models.LoraSettings(rank=4))
    sampler = HFSampler(model, merge_lora=True)
    unmerged = HFSampler(model, merge_lora=False)
    for update in range(3):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(update))
        anyio.run(sampler.update_weights, model)
        out = sampler.generate([prompts[2]], [GREEDY])[0]
        assert out.tokens == unmerged.generate([prompts[2]], [GREEDY])[0].tokens
        model.eval()
        expected = teacher_forced_logprobs(model, prompts[2], out.tokens)
        assert_close(out.model_logprobs, expected)
    assert sampler.decoder() is sampler._merged.model  # one copy, refreshed in place
    assert not hasattr(sampler.decoder(), "peft_config")


def test_a_sleeping_sampler_frees_the_merged_copy_and_wakes_with_the_current_weights(
    make_tiny_model, prompts
):
    model = models.add_lora(make_tiny_model(seed=6), models.LoraSettings(rank=4))
    sampler = HFSampler(model, merge_lora=True)
    sampler.generate([prompts[0]], [GREEDY])
    copy_bytes = sum(p.numel() for p in sampler._merged.model.parameters())
    assert copy_bytes > 0
    anyio.run(sampler.sleep)
    assert sum(p.numel() for p in sampler._merged.model.parameters()) == 0
    with torch.no_grad():  # the trainer's update happens while the sampler sleeps
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(9))
    anyio.run(sampler.update_weights, model)
    out = sampler.generate([prompts[2]], [GREEDY])[0]
    assert sum(p.numel() for p in sampler._merged.model.parameters()) == copy_bytes
    model.eval()
    assert_close(out.model_logprobs, teacher_forced_logprobs(model, prompts[2], out.tokens))


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_entries():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    rows = 40_000
    drawn = _draw(probs.expand(rows, -1).contiguous(), generator)
    counts = torch.bincount(drawn, minlength=len(probs)).float() / rows
    assert counts[probs == 0].sum() == 0
    # 40k draws: the standard error of each frequency is below 0.0025
    torch.testing.assert_close(counts, probs, atol=0.012, rtol=0)


def test_inverse_cdf_draws_respect_each_rows_support():
    probs = torch.zeros(3, 50)
    probs[0, 7] = 1.0  # one token left (greedy-like after filtering)
    probs[1, [0, 49]] = torch.tensor([0.25, 0.75])  # the last entry of the vocabulary
    probs[2, 10:20] = 0.1
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        drawn = _draw(probs, generator)
        assert drawn[0] == 7
        assert drawn[1] in (0, 49)
        assert 10 <= drawn[2] < 20


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_the_merged_copy_equals_peft_merging_the_active_adapters(make_tiny_model, dora):
    from peft import LoraConfig

    model = models.add_lora(make_tiny_model(seed=7), models.LoraSettings(rank=4))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    model.base_model.set_adapter(["default", "second"])
    if dora:  # DoRA deltas are not B @ A: they take peft's own path
        model.add_adapter("dora", LoraConfig(r=2, use_dora=True, target_modules=["v_proj"]))
        model.base_model.set_adapter(["default", "second", "dora"])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    merged = MergedLoRA(model)
    merged.release()
    merged.refresh()  # into freshly allocated buffers
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    actual = dict(merged.model.named_parameters())
    assert actual.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight, rtol=1e-5, atol=1e-5, msg=name)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(actual["model.layers.0.self_attn.q_proj.weight"], base)
