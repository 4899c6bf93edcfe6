"""A merged copy of a LoRA model for decoding.

A peft LoRA layer runs three matmuls per forward (the base weight, A, B) plus casts; at decode
time on CPU, where each step is a handful of tokens, that per-call overhead dominates: the
embedded SmolLM2 with a rank-16 adapter decodes 4 x 64 tokens in 5.1 s through peft and 3.7 s
with the adapter merged (bf16, 2 cores). Merging in place and unmerging afterwards would drift
the trained base weights in bf16, so the sampler decodes from a separate plain copy whose
weights are refreshed whenever the trainer's weights change.

The copy's weights live in one flat buffer per dtype and device, and a refresh writes each
merged weight with one ``addmm`` (base + scale * B @ A, straight into the buffer; adapters that
are not plain linear LoRA, such as DoRA, take peft's own merge into a new copy). Per-weight
tensors plus peft's ``get_delta_weight`` (a float32 delta per layer, cast, then added) took
140-320 ms per refresh of the embedded SmolLM2 (rank 16, bf16, 2 cores); this takes 50-80 ms,
110-170 ms right after a ``release``, and is as close to the float32 merge. One buffer also
lets ``release`` hand the whole copy back to the OS: a block that large is its own ``mmap``,
while per-weight blocks come from glibc's heap and fragment it (``training.allocator``). The
buffer follows the model's parameter order, so sibling projections (``q``/``k``/``v``,
``gate``/``up``) lie back to back and the lean decoding step (``samplers.llama``) computes each
group as one matmul over a view of the buffer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from training.allocator import return_free_memory


@dataclass(frozen=True)
class _Slot:
    """Where one weight lives in its flat buffer."""

    key: tuple[torch.dtype, torch.device]
    offset: int
    shape: torch.Size

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.shape.numel()].view(self.shape)


class MergedLoRA:
    """A plain copy of ``model`` (a peft model) with its active adapters merged in."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.source = model
        self.model = _merged_copy(model)
        self._targets = dict(self.model.named_parameters())
        self._sources = _source_names(model, self._targets)
        self._slots, self._sizes = _layout(self._targets)
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._released = False
        if self._sources is not None:  # move into the buffers; the copy's own weights go
            self._allocate()
            self.refresh()
            return_free_memory()  # back to the heap, whose free pages this returns

    def refresh(self) -> None:
        """Bring the copy up to date with the source's current weights: base + scale * B @ A
        in place; a new copy from peft's own merge when some weight has no plain source or
        some adapter is not a plain linear LoRA (DoRA rescales the merged weight)."""
        model = self.source
        self._released = False
        layers = dict(_lora_layers(model))
        if self._sources is None or not all(map(_is_plain, layers.values())):
            self._buffers.clear()
            self.model = _merged_copy(model)
            self._targets = dict(self.model.named_parameters())
            return
        if not self._buffers:
            self._allocate()
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for target, source in self._sources.items():
                weight, base = self._targets[target], parameters[source]
                layer = layers.get(target.removesuffix(".weight"))
                adapters = [] if layer is None else _active_adapters(layer)
                if not adapters:
                    weight.copy_(base)
                for i, adapter in enumerate(adapters):
                    b = layer.lora_B[adapter].weight.to(weight.dtype)
                    a = layer.lora_A[adapter].weight.to(weight.dtype)
                    scale = layer.scaling[adapter]
                    if i == 0:
                        torch.addmm(base, b, a, alpha=scale, out=weight)
                    else:
                        weight.addmm_(b, a, alpha=scale)

    @property
    def released(self) -> bool:
        """The weights were freed by ``release`` and not yet brought back."""
        return self._released

    def release(self) -> None:
        """Free the copy's weights (the module structure stays); ``refresh`` brings them back.
        Training does not need them, and they are a whole model's worth of memory."""
        for weight in self._targets.values():
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self._buffers.clear()
        self._released = True

    def _allocate(self) -> None:
        self._buffers = {
            key: torch.empty(size, dtype=key[0], device=key[1]) for key, size in self._sizes.items()
        }
        for name, slot in self._slots.items():
            self._targets[name].data = slot.view(self._buffers[slot.key])


def _layout(
    targets: dict[str, torch.Tensor],
) -> tuple[dict[str, _Slot], dict[tuple[torch.dtype, torch.device], int]]:
    slots, sizes = {}, {}
    for name, weight in targets.items():
        key = (weight.dtype, weight.device)
        slots[name] = _Slot(key, sizes.get(key, 0), weight.shape)
        sizes[key] = sizes.get(key, 0) + weight.numel()
    return slots, sizes


def _active_adapters(layer) -> list[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _is_plain(layer) -> bool:
    """Each active adapter's delta is ``scale * B @ A`` on a ``[out, in]`` weight."""
    return not getattr(layer, "fan_in_fan_out", False) and all(
        isinstance(layer.lora_A[adapter], torch.nn.Linear)
        and isinstance(layer.lora_B[adapter], torch.nn.Linear)
        and not getattr(layer, "use_dora", {}).get(adapter, False)
        for adapter in _active_adapters(layer)
    )


def _merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    merged = copy.deepcopy(model).merge_and_unload().eval().requires_grad_(False)
    for parameter in merged.parameters():
        parameter.grad = None
    return merged


def is_lora(model: torch.nn.Module) -> bool:
    """A peft model whose tuner layers are all LoRA layers that can merge."""
    if not hasattr(model, "peft_config") or not hasattr(model, "merge_and_unload"):
        return False
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(tuners) and all(isinstance(m, LoraLayer) for m in tuners)


def _plain_name(peft_name: str) -> str:
    """``base_model.model.x.q_proj.base_layer.weight`` -> ``x.q_proj.weight``."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield _plain_name(name), module


def _source_names(
    model: torch.nn.Module, targets: dict[str, torch.Tensor]
) -> dict[str, str] | None:
    """Merged-copy parameter name -> the peft model's parameter that holds its base weight;
    None when some weight has no plain source (e.g. modules_to_save): refresh then rebuilds."""
    sources = {}
    for name, _ in model.named_parameters():
        if "lora_" in name:
            continue
        sources[_plain_name(name)] = name
    if not set(targets) <= set(sources):
        return None
    return {target: sources[target] for target in targets}
