"""Peak memory and time of the chunked loss computations against the naive ones, forward plus
backward, on SmolLM2-sized shapes (H=576, V=49152).

- ``logprobs``: per-token logprobs and entropy of a T-token sequence from its final hidden
  states. Naive: ``hidden @ W.T`` -> ``log_softmax`` -> gather (autograd keeps [T, V] tensors).
  Chunked: :func:`training.losses.token_logprobs` (logits rebuilt per chunk in backward). The
  lm_head is frozen, as with LoRA. Target: chunked peak <= 25% of naive.
- ``jsd``: :func:`training.losses.generalized_jsd_loss` on given [1, T, V] student and teacher
  logits, unchunked vs ``chunk_size``; the logits themselves are inputs and not counted.

Each measurement runs in a fresh process. Peak memory is the growth of resident memory (the
kernel's peak mark, reset once the inputs are allocated) above what it held then, with glibc told to
serve blocks >= 1 MiB by mmap so that freed tensors leave. Time is the median of three runs in
another process with the default allocator. Usage::

    python -m bench.loss_memory [quick] [jsd_length=T]

``jsd_length`` (default 2048; 512 in quick mode) sets the JSD case's T: at 8192 the naive JSD
needs ~17 GB.

The last line printed is one JSON object.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.common import context, in_fresh_process, reset_peak_rss, run_main, status_mb

HIDDEN, VOCAB = 576, 49152


def _case(kind: str, chunked: bool, length: int, vocab: int, chunk_size: int) -> dict[str, Any]:
    """Peak memory of one forward+backward, after warming the same path up on a small problem
    (lazy kernels, thread pools)."""
    _make_step(kind, chunked, max(length // 16, 1), vocab, max(chunk_size // 16, 1))()
    step = _make_step(kind, chunked, length, vocab, chunk_size)
    baseline = reset_peak_rss()  # the inputs' temporaries, the warm-up: not the step's peak
    grad = step()
    peak = status_mb("VmHWM") - baseline
    return {"peak_mb": round(peak, 1), "grad_checksum": float(grad.double().abs().sum())}


def _timing(kind: str, chunked: bool, length: int, vocab: int, chunk_size: int) -> float:
    """Median seconds of one forward+backward over three runs, after one warm-up run."""
    step = _make_step(kind, chunked, length, vocab, chunk_size)
    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return round(sorted(times)[1], 3)


def _make_step(kind: str, chunked: bool, length: int, vocab: int, chunk_size: int):
    import torch

    from training.losses import generalized_jsd_loss, token_logprobs

    gen = torch.Generator().manual_seed(0)
    if kind == "logprobs":
        hidden = torch.randn(length, HIDDEN, generator=gen).requires_grad_()
        weight = torch.randn(vocab, HIDDEN, generator=gen) / HIDDEN**0.5
        tokens = torch.randint(0, vocab, (length,), generator=gen)

        def step() -> torch.Tensor:
            hidden.grad = None
            if chunked:
                logprobs, entropy = token_logprobs(hidden, weight, tokens, chunk_size=chunk_size)
            else:
                logp = torch.log_softmax(hidden @ weight.T, dim=-1)
                logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
                entropy = -(logp.exp() * logp).sum(-1)
            (logprobs.sum() + 0.01 * entropy.sum()).backward()
            return hidden.grad

    else:
        student = torch.randn(1, length, vocab, generator=gen).requires_grad_()
        teacher = torch.randn(1, length, vocab, generator=gen)
        mask = torch.ones(1, length, dtype=torch.bool)

        def step() -> torch.Tensor:
            student.grad = None
            loss = generalized_jsd_loss(
                student, teacher, mask, beta=0.5, chunk_size=chunk_size if chunked else None
            ).loss
            loss.backward()
            return student.grad

    return step


# For memory: large blocks straight from mmap and returned on free, so resident memory tracks live
# tensors. Not for timing: it adds page faults to every chunk's temporaries.
LOW_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _compare(kind: str, length: int, vocab: int, chunk_size: int) -> dict[str, Any]:
    rows = {}
    for name, chunked in (("naive", False), ("chunked", True)):
        args = (kind, chunked, length, vocab, chunk_size)
        rows[name] = in_fresh_process(_case, *args, env=LOW_MMAP_THRESHOLD)
        rows[name]["seconds"] = in_fresh_process(_timing, *args)
    checksum_diff = abs(rows["naive"].pop("grad_checksum") - rows["chunked"].pop("grad_checksum"))
    return {
        "T": length,
        "V": vocab,
        "chunk_size": chunk_size,
        **rows,
        "peak_ratio": round(rows["chunked"]["peak_mb"] / max(rows["naive"]["peak_mb"], 1e-9), 3),
        "grad_checksum_diff": checksum_diff,
    }


def main(quick: bool = False, jsd_length: int | str | None = None) -> dict[str, Any]:
    result = context("loss_memory", quick)
    if quick:
        logprobs = _compare("logprobs", 2048, 16384, 256)
        jsd = _compare("jsd", int(jsd_length or 512), 16384, 64)
    else:
        logprobs = _compare("logprobs", 8192, VOCAB, 1024)
        jsd = _compare("jsd", int(jsd_length or 2048), VOCAB, 256)
    for name, row in (("logprobs", logprobs), ("jsd", jsd)):
        print(
            f"{name:9s} T={row['T']} V={row['V']} chunk={row['chunk_size']}: "
            f"naive {row['naive']['peak_mb']:.0f} MB {row['naive']['seconds']:.2f} s, "
            f"chunked {row['chunked']['peak_mb']:.0f} MB {row['chunked']['seconds']:.2f} s "
            f"({row['peak_ratio']:.0%} of naive peak)",
            file=sys.stderr,
        )
    return result | {
        "logprobs": logprobs,
        "jsd": jsd,
        "target": "logprobs chunked peak <= 25% of naive",
        "target_met": logprobs["peak_ratio"] <= 0.25,
    }


if __name__ == "__main__":
    run_main(main)
