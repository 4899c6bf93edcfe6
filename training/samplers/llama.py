"""A lean decoding step for Llama-family models (Llama, Mistral, Qwen2, Qwen3).

A decoding step at a small batch on CPU reads every weight once for a few rows, and the model's
own forward adds a fixed cost per module call and per op on top (mask building, cache classes,
module hooks, per-head reshapes): for the embedded SmolLM2 at batch 4, ~9 ms of a ~42 ms step.
This step is the same arithmetic as transformers' forward, in the same order and precision
(so the same tokens come out), written as ~20 tensor ops per layer:

- sibling projections that read the same input (``q``/``k``/``v``, ``gate``/``up``) are one
  matmul when their weights lie back to back in memory, as in the sampler's merged LoRA copy
  (``samplers.merged``); otherwise each is its own matmul, reading the weights where they are;
- RoPE is applied to queries and keys together; single-query attention runs on the key/value
  heads (queries grouped per KV head, as transformers does for one token), so keys and values
  are never repeated;
- keys and values live in per-model buffers ``[layers, batch, kv_heads, capacity, head_dim]``
  written in place, grown by half when full: transformers' ``DynamicCache`` concatenates every
  layer's whole cache on every step, which is quadratic in the length of an agent's episode.

Prefill (a whole context at once) runs the model's own forward and moves its cache into the
buffers. Architectures are recognised by their transformers class; anything else (sliding
windows, other activations, biased MLPs, peft or quantized layers) decodes through the model's
own forward (``decoders.HFDecoder``), with ``unsupported`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from training.samplers.decoders import HFDecoder

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""transformers classes whose decoder layer this step reproduces, by model type."""

_HEADROOM = 64
"""Columns allocated beyond a cache's width when it is built or grown (at least)."""


@dataclass(eq=False)
class KVBuffers:
    """Every layer's keys and values, ``[layers, batch, kv_heads, capacity, head_dim]`` each;
    columns ``[0, width)`` are filled (left padding included, as zeros)."""

    keys: torch.Tensor
    values: torch.Tensor
    width: int

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @classmethod
    def zeros(cls, layer: torch.Tensor, layers: int, batch: int, width: int) -> KVBuffers:
        """Zeroed buffers for ``layers`` layers of ``batch`` rows, ``width`` columns counted as
        filled, heads, dtype and device as in ``layer`` (one layer's keys, ``[B, H, W, D]``);
        room for half the width more (at least ``_HEADROOM``)."""
        _, heads, _, dim = layer.shape
        shape = (layers, batch, heads, width + max(_HEADROOM, width // 2), dim)
        keys = torch.zeros(shape, dtype=layer.dtype, device=layer.device)
        return cls(keys, torch.zeros_like(keys), width)

    @classmethod
    def from_cache(cls, cache: DynamicCache) -> KVBuffers:
        """Buffers holding a transformers cache's keys and values (every column filled)."""
        first = cache.layers[0].keys  # [B, kv_heads, W, head_dim]
        buffers = cls.zeros(first, len(cache.layers), first.shape[0], first.shape[2])
        for index, layer in enumerate(cache.layers):
            buffers.keys[index, :, :, : buffers.width] = layer.keys
            buffers.values[index, :, :, : buffers.width] = layer.values
        return buffers

    def like(self, batch: int, width: int) -> KVBuffers:
        """Zeroed buffers with this one's layers, heads, dtype and device."""
        return KVBuffers.zeros(self.keys[0], self.keys.shape[0], batch, width)

    def reserve(self, columns: int) -> None:
        """Room for ``columns`` more, growing by half the width (at least ``_HEADROOM``)."""
        if self.width + columns <= self.capacity:
            return
        grown = self.like(self.keys.shape[1], self.width + columns - 1)
        grown.keys[:, :, :, : self.width] = self.keys[:, :, :, : self.width]
        grown.values[:, :, :, : self.width] = self.values[:, :, :, : self.width]
        self.keys, self.values = grown.keys, grown.values


@dataclass(eq=False)
class _Layer:
    """One decoder layer's weights, as the step reads them."""

    input_norm: torch.Tensor
    qkv: list[torch.Tensor]
    """``[q; k; v]`` as one stacked view, or the three weights."""
    qkv_bias: list[torch.Tensor] | None
    """Their biases, one per entry of ``qkv`` (None: no biases)."""
    qk_norm: torch.Tensor | None
    """Qwen3's per-head norms of queries and keys, as one ``[q_heads + kv_heads, head_dim]``."""
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: list[torch.Tensor]
    """``[gate; up]`` as one stacked view, or the two weights."""
    down: torch.Tensor


class LlamaDecoder:
    """The lean decoding step over ``model``'s current weights (see the module docstring).

    Build one per batch of decoding: stacked projections are views of the weights' memory as it
    is laid out now (the sampler makes a new one after its merged copy is reallocated)."""

    @staticmethod
    def unsupported(model: torch.nn.Module) -> str | None:
        """Why this step cannot run ``model`` (None: it can)."""
        name = type(model).__name__
        family = FAMILIES.get(name)
        if family is None or not type(model).__module__.startswith("transformers.models."):
            return f"{name} is not one of {', '.join(FAMILIES)}"
        config = model.config
        if getattr(config, "hidden_act", None) != "silu":
            return f"hidden_act={config.hidden_act!r} (the step computes silu)"
        if getattr(config, "mlp_bias", False):
            return "mlp_bias=True"
        layer_types = getattr(config, "layer_types", None) or []
        sliding = family == "mistral" and getattr(config, "sliding_window", None) is not None
        if sliding or any(kind != "full_attention" for kind in layer_types):
            return "sliding-window attention"
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            linears = [getattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if not all(type(linear) is torch.nn.Linear for linear in linears):
                return "its projections are not plain torch.nn.Linear (peft or quantized layers)"
        if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
            return "the LM head is not a plain bias-free linear"
        return None

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = model.model.norm.variance_epsilon
        self.embed = model.model.embed_tokens.weight.detach()
        self.final_norm = model.model.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.rotary = model.model.rotary_emb
        self.layers = [self._layer(layer) for layer in model.model.layers]
        self._prefill = HFDecoder(model)

    def _layer(self, layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
        qk_norm = None
        if hasattr(attention, "q_norm"):
            qk_norm = torch.cat(
                [
                    attention.q_norm.weight.detach().expand(self.heads, -1),
                    attention.k_norm.weight.detach().expand(self.kv_heads, -1),
                ]
            )
        weights = _stacked([p.weight for p in qkv])
        biases = None
        if qkv[0].bias is not None:  # Qwen2: a copy is fine, biases do not change mid-batch
            biases = [p.bias.detach() for p in qkv]
            biases = [torch.cat(biases)] if len(weights) == 1 else biases
        return _Layer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=weights,
            qkv_bias=biases,
            qk_norm=qk_norm,
            out=attention.o_proj.weight.detach(),
            out_bias=_detached(attention.o_proj.bias),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=_stacked([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight.detach(),
        )

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int
    ) -> tuple[torch.Tensor, KVBuffers]:
        logits, cache = self._prefill.prefill(ids, mask, positions, keep)
        return logits, KVBuffers.from_cache(cache)

    def step(
        self,
        tokens: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: KVBuffers,
    ) -> torch.Tensor:
        rows, heads, kv_heads, dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        column = cache.width
        if attention.shape[1] != column + 1:
            raise ValueError(f"attention is {attention.shape[1]} wide; expected {column + 1}")
        cache.reserve(1)
        x = F.embedding(tokens[:, None], self.embed)  # [B, 1, H]
        cos, sin = self.rotary(x, positions[:, None])  # [B, 1, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, 1, 1, D]: over every head
        mask = attention[:, None, None, :].bool()  # [B, 1, 1, W + 1]
        q_size, kv_size = heads * dim, kv_heads * dim
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm)
            qkv = _project(h, layer.qkv, layer.qkv_bias)  # [B, 1, (heads + 2 kv) * D]
            qk = qkv[..., : q_size + kv_size].view(rows, 1, heads + kv_heads, dim)
            if layer.qk_norm is not None:
                qk = self._norm(qk, layer.qk_norm)
            qk = qk * cos + _rotate_half(qk) * sin
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, column] = qk[:, 0, heads:]
            values[:, :, column] = qkv[:, 0, q_size + kv_size :].view(rows, kv_heads, dim)
            # One query: group the query heads under their KV head instead of repeating K, V.
            query = qk[:, 0, :heads].view(rows, kv_heads, heads // kv_heads, dim)
            attended = F.scaled_dot_product_attention(
                query, keys[:, :, : column + 1], values[:, :, : column + 1], attn_mask=mask
            )
            x = x + F.linear(attended.reshape(rows, 1, q_size), layer.out, layer.out_bias)
            h = self._norm(x, layer.post_norm)
            gate, up = _project(h, layer.gate_up, None).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        cache.width = column + 1
        return F.linear(self._norm(x[:, 0], self.final_norm), self.lm_head)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' RMSNorm: normalised in float32, cast back, then scaled."""
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * normed.to(x.dtype)

    def select(self, cache: KVBuffers, index: torch.Tensor) -> KVBuffers:
        return KVBuffers(cache.keys[:, index], cache.values[:, index], cache.width)

    def merge(self, caches: list[KVBuffers], widths: list[int]) -> KVBuffers:
        width = max(widths)
        merged = caches[0].like(sum(c.keys.shape[1] for c in caches), width)
        row = 0
        for cache, w in zip(caches, widths, strict=True):
            if cache.width != w:
                raise ValueError(f"a cache {cache.width} wide was merged as {w} wide")
            rows = slice(row, row + cache.keys.shape[1])
            merged.keys[:, rows, :, width - w : width] = cache.keys[:, :, :, :w]
            merged.values[:, rows, :, width - w : width] = cache.values[:, :, :, :w]
            row = rows.stop
        return merged


def _project(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None
) -> torch.Tensor:
    """``x`` through sibling projections, their outputs side by side."""
    outputs = [
        F.linear(x, weight, None if biases is None else bias)
        for weight, bias in zip(weights, biases or weights, strict=True)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _stacked(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[w1; w2; ...]`` as one view when the weights lie back to back in one block of memory
    (same dtype, device and width), else the weights themselves."""
    first = weights[0].detach()
    offset = first.storage_offset()
    for weight in weights:
        if (
            not weight.is_contiguous()
            or weight.dtype != first.dtype
            or weight.shape[1:] != first.shape[1:]
            or weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or weight.storage_offset() != offset
        ):
            return [w.detach() for w in weights]
        offset += weight.numel()
    rows = sum(w.shape[0] for w in weights)
    return [first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())]
