"""What both vLLM samplers share: SamplingParams -> vLLM options, and vLLM's answer ->
SampledTokens (forced envelope, stop cuts, the two logprob kinds)."""

from __future__ import annotations

import math

import pytest

from training.samplers.vllm_common import (
    banned_texts,
    completion_budget,
    forced_tokens,
    needs_processed_logprobs,
    sampled_tokens,
    stop_texts,
    stop_token_ids,
)
from training.types import SamplingParams

ENVELOPE = (44, 19324, 79, 4350, 46)  # "<tool_call>" in SmolLM2's vocabulary


def test_required_forces_the_envelope_and_records_its_model_logprobs():
    params = SamplingParams(max_tokens=8, tool_choice="required", forced_prefix=ENVELOPE)
    forced = forced_tokens(params)
    assert forced == list(ENVELOPE) and completion_budget(params, forced) == 3
    out = sampled_tokens(
        params,
        "raw_logprobs",
        forced=forced,
        forced_model_logprobs=[-0.1, -0.2, -0.3, -0.4, -0.5],
        tokens=[7, 8],
        logprobs=[-1.0, -2.0],
        finish_reason="length",
    )
    assert out.tokens == [*ENVELOPE, 7, 8] and out.num_forced == 5
    assert out.sampling_logprobs == [0.0] * 5 + [-1.0, -2.0]
    assert out.model_logprobs == [-0.1, -0.2, -0.3, -0.4, -0.5, -1.0, -2.0]
    assert out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_tokens=5 leaves no room after the 5-token"):
        completion_budget(SamplingParams(max_tokens=5, tool_choice="required"), forced)


def test_only_required_forces_anything():
    for choice in ("auto", "none"):
        assert forced_tokens(SamplingParams(tool_choice=choice, forced_prefix=ENVELOPE)) == []


def test_a_stop_sequence_cuts_the_sampled_tokens_after_it():
    params = SamplingParams(stop_sequences=((5, 6),))
    out = sampled_tokens(
        params,
        "raw_logprobs",
        forced=[],
        forced_model_logprobs=[],
        tokens=[4, 5, 6, 7, 8],
        logprobs=[-1.0, -2.0, -3.0, -4.0, -5.0],
        finish_reason="length",
    )
    assert out.tokens == [4, 5, 6] and out.model_logprobs == [-1.0, -2.0, -3.0]
    assert out.finish_reason == "stop"


def test_a_stop_sequence_inside_the_forced_envelope_does_not_end_the_turn():
    params = SamplingParams(
        tool_choice="required", forced_prefix=ENVELOPE, stop_sequences=((4350, 46),)
    )
    out = sampled_tokens(
        params,
        "raw_logprobs",
        forced=list(ENVELOPE),
        forced_model_logprobs=[-0.1] * 5,
        tokens=[9, 10],
        logprobs=[-1.0, -2.0],
        finish_reason="length",
    )
    assert out.tokens == [*ENVELOPE, 9, 10] and out.finish_reason == "length"


def test_logprob_kinds():
    def one(params: SamplingParams, mode):
        return sampled_tokens(
            params,
            mode,
            forced=[],
            forced_model_logprobs=[],
            tokens=[3],
            logprobs=[-0.7],
            finish_reason="stop",
        )

    plain = one(SamplingParams(), "raw_logprobs")
    assert plain.sampling_logprobs == plain.model_logprobs == [-0.7]
    greedy = one(SamplingParams(temperature=0.0), "raw_logprobs")
    assert greedy.sampling_logprobs == [0.0] and greedy.model_logprobs == [-0.7]
    processed = one(SamplingParams(temperature=0.7), "processed_logprobs")
    assert processed.sampling_logprobs == [-0.7] and math.isnan(processed.model_logprobs[0])
    # Raw logprobs are the sampling distribution's only at temperature 1 without filters.
    assert not needs_processed_logprobs(SamplingParams(), "raw_logprobs")
    assert not needs_processed_logprobs(SamplingParams(temperature=0.0), "raw_logprobs")
    for params in (SamplingParams(temperature=0.7), SamplingParams(top_k=20)):
        assert needs_processed_logprobs(params, "raw_logprobs")
        assert not needs_processed_logprobs(params, "processed_logprobs")
    assert needs_processed_logprobs(SamplingParams(top_p=0.9), "raw_logprobs")


def test_stops_and_bans_as_vllm_takes_them(smollm2_tokenizer):
    closing = tuple(smollm2_tokenizer.encode("</tool_call>"))
    assert len(closing) > 1
    params = SamplingParams(
        stop_sequences=((2,), closing), tool_choice="none", forced_prefix=ENVELOPE
    )
    assert stop_token_ids(params) == [2]  # one-token stops as ids, longer ones as text
    assert stop_texts(smollm2_tokenizer, params) == ["</tool_call>"]
    assert banned_texts(smollm2_tokenizer, params) == ["<tool_call>"]
    assert banned_texts(smollm2_tokenizer, SamplingParams(forced_prefix=ENVELOPE)) == []
