"""How the sampler runs a model: prefill a group of contexts, then one position per step.

``HFSampler`` keeps the batching (which rows decode, masks, positions, sampling); a
``Decoder`` owns the forward passes and the KV cache's layout. Two implementations:

- ``HFDecoder``: the model's own forward with transformers' ``DynamicCache``. Works for any
  causal LM (plain or peft).
- ``LlamaDecoder`` (``samplers.llama``): for Llama-family models (Llama, Mistral, Qwen2,
  Qwen3) a decoding step written as a few tensor ops per layer, reading the weights where they
  are, with KV buffers that grow in place. Prefill still runs the model's own forward.

``make_decoder`` picks the lean one where it applies. Caches are opaque to the sampler; it only
asks a decoder to keep some rows of one (``select``) or to join several, left-padded to the
widest (``merge``).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class Decoder(Protocol):
    """Forward passes for one model, with a cache of its own kind."""

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int
    ) -> tuple[torch.Tensor, Any]:
        """Left-padded contexts ``ids``/``mask``/``positions`` [G, W] -> (logits of the last
        ``keep`` positions [G, keep, V], a cache W wide)."""
        ...

    def step(
        self, tokens: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """One new token per row: ``tokens`` [B], ``attention`` [B, W + 1] (the new column
        included), ``positions`` [B] -> next-token logits [B, V]; the cache grows one column."""
        ...

    def select(self, cache: Any, index: torch.Tensor) -> Any:
        """The cache of rows ``index`` only."""
        ...

    def merge(self, caches: list[Any], widths: list[int]) -> Any:
        """Caches of ``widths`` columns stacked along the batch, left-padded to the widest."""
        ...


def make_decoder(model: torch.nn.Module, *, lean: bool | None = None) -> Decoder:
    """The lean decoder where the model's architecture has one (``lean`` None or True), else
    the model's own forward. ``lean=True`` on an architecture without one is an error."""
    from training.samplers.llama import LlamaDecoder

    reason = LlamaDecoder.unsupported(model)
    if lean is True and reason:
        raise ValueError(f"lean decoding is not available for this model: {reason}")
    if lean is False or reason:
        return HFDecoder(model)
    return LlamaDecoder(model)


class HFDecoder:
    """The model's own forward and ``DynamicCache``: any causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._cache_kwarg = _cache_kwarg(model)

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: int
    ) -> tuple[torch.Tensor, DynamicCache]:
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kwarg: cache},
        )
        return out.logits, cache

    def step(
        self,
        tokens: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=attention,
            position_ids=positions[:, None],
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1, :]

    def select(self, cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
        cache.batch_select_indices(index)
        return cache

    def merge(self, caches: list[DynamicCache], widths: list[int]) -> DynamicCache:
        width = max(widths)
        layers = []
        for layer in range(len(caches[0].layers)):
            keys, values = [], []
            for cache, w in zip(caches, widths, strict=True):
                pad = (0, 0, width - w, 0)
                keys.append(F.pad(cache.layers[layer].keys, pad))
                values.append(F.pad(cache.layers[layer].values, pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(layers)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` is
    deprecated); older releases only know ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
