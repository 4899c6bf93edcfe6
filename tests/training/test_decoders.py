"""The lean decoding step (samplers.llama) against the model's own forward (samplers.decoders):
the same logits for every supported family, through prefill, merging, dropping rows and
growing the KV buffers; one matmul per sibling group over the merged copy; the rest refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from training import models
from training.samplers import HFSampler
from training.samplers.decoders import HFDecoder, make_decoder
from training.samplers.llama import _HEADROOM, LlamaDecoder
from training.samplers.merged import MergedLoRA
from training.types import SamplingParams

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True)),
    "llama-mha-untied": lambda: LlamaForCausalLM(
        LlamaConfig(**{**SHAPE, "num_key_value_heads": 4}, tie_word_embeddings=False)
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),  # biased q/k/v
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=24)),  # q/k norms
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial norms, so a misplaced norm weight shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def left_padded(contexts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    width = max(map(len, contexts))
    ids = torch.zeros((len(contexts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, context in enumerate(contexts):
        ids[i, width - len(context) :] = torch.tensor(context)
        mask[i, width - len(context) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def drive(decoder, steps: int) -> list[torch.Tensor]:
    """Two prefilled groups merged, decoded, a row dropped, decoded past the KV headroom."""
    generator = torch.Generator().manual_seed(1)
    groups = [[[5, 9, 2, 7, 11, 3, 8]], [[4, 1, 6], [10, 12, 13, 14]]]
    logits, caches, masks, lengths = [], [], [], []
    for contexts in groups:
        ids, mask, positions = left_padded(contexts)
        group_logits, cache = decoder.prefill(ids, mask, positions, keep=2)
        logits.append(group_logits[:, -1])
        caches.append(cache)
        masks.append(mask)
        lengths.append(mask.sum(-1))
    widths = [m.shape[1] for m in masks]
    cache = decoder.merge(caches, widths)
    attention = torch.cat([F.pad(m, (max(widths) - m.shape[1], 0)) for m in masks])
    positions = torch.cat(lengths)
    next_logits = torch.cat(logits)
    seen = [next_logits]
    for step in range(steps):
        tokens = torch.randint(0, SHAPE["vocab_size"], (attention.shape[0],), generator=generator)
        if step == 3:  # the middle row leaves the batch
            keep = torch.tensor([0, 2])
            cache, attention = decoder.select(cache, keep), attention[keep]
            positions, tokens = positions[keep], tokens[keep]
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], 1)
        seen.append(decoder.step(tokens, attention, positions, cache))
        positions = positions + 1
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_lean_step_gives_the_models_own_logits(family):
    model = build(family)
    assert LlamaDecoder.unsupported(model) is None
    lean = make_decoder(model)
    assert isinstance(lean, LlamaDecoder)
    steps = _HEADROOM + 12  # past the first allocation: the buffers grow once
    expected = drive(HFDecoder(model), steps)
    actual = drive(lean, steps)
    assert len(actual) == steps + 1
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=f"step {index}")


def test_the_merged_copy_runs_each_sibling_group_as_one_matmul(make_tiny_model, monkeypatch):
    model = models.add_lora(make_tiny_model(seed=8), models.LoraSettings(rank=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    merged = MergedLoRA(model)
    lean = LlamaDecoder(merged.model)
    buffer = merged.model.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    for layer in lean.layers:
        assert len(layer.qkv) == 1 and len(layer.gate_up) == 1  # views of the flat buffer
        assert layer.qkv[0].untyped_storage().data_ptr() == buffer
    plain = LlamaDecoder(make_tiny_model(seed=8))  # weights in their own tensors: one each
    assert [len(layer.qkv) for layer in plain.layers] == [3, 3]

    calls = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    ids, mask, positions = left_padded([[5, 17, 42, 7], [99, 3]])
    _, cache = lean.prefill(ids, mask, positions, keep=1)
    calls.clear()
    attention = torch.cat([mask, mask.new_ones(2, 1)], 1)
    logits = lean.step(torch.tensor([8, 9]), attention, mask.sum(-1), cache)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers + 1  # [q; k; v], o, [gate; up], down per layer + LM head
    monkeypatch.undo()
    expected = model.merge_and_unload().eval()
    full = torch.cat([ids, torch.tensor([[8], [9]])], 1)
    with torch.no_grad():
        reference = expected(input_ids=full, attention_mask=attention).logits[:, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_embedded_model_samples_the_same_tokens_either_way(embedded_model_dir):
    """bf16, a LoRA student decoding from its merged copy (the trainer's case): bit for bit."""
    model = models.load_model(embedded_model_dir, dtype="bf16", device="cpu")
    model = models.add_lora(model, models.LoraSettings(rank=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    tokenizer = models.load_tokenizer(embedded_model_dir)
    prompts = [tokenizer.encode(t) for t in ("Write a story about a fox.", "hi", "2 + 2 =")]
    params = [SamplingParams(max_tokens=40, temperature=1.0)] * len(prompts)
    runs = {}
    for lean in (False, True):
        sampler = HFSampler(model, tokenizer, seed=4, lean_decoding=lean, eos_token_ids=())
        runs[lean] = sampler.generate(prompts, params)
    for own, ours in zip(runs[False], runs[True], strict=True):
        assert ours.tokens == own.tokens
        assert ours.model_logprobs == own.model_logprobs
        assert ours.sampling_logprobs == own.sampling_logprobs


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), "not one of"),
        (
            lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)),
            "sliding-window",
        ),
        (lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, hidden_act="gelu")), "hidden_act='gelu'"),
        (lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, mlp_bias=True)), "mlp_bias"),
        (
            lambda: models.add_lora(build("llama"), models.LoraSettings(rank=2)),
            "not one of",  # the peft wrapper itself
        ),
        (
            lambda: models.add_lora(build("llama"), models.LoraSettings(rank=2)).get_base_model(),
            "not plain torch.nn.Linear",
        ),
    ],
    ids=["gpt2", "sliding", "gelu", "mlp-bias", "peft", "lora-layers"],
)
def test_other_models_decode_through_their_own_forward(model, reason):
    model = model()
    assert reason in LlamaDecoder.unsupported(model)
    assert isinstance(make_decoder(model), HFDecoder)
    assert isinstance(make_decoder(model, lean=False), HFDecoder)
    with pytest.raises(ValueError, match="lean decoding is not available for this model: "):
        make_decoder(model, lean=True)
