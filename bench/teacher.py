"""Teacher scoring throughput on the embedded SmolLM2: the chunked ``LocalTeacher`` against a
naive full-logits pass (fp32 and bf16), and the vLLM CPU server through
``VLLMServerTeacher``; plus the wire cost of the server's answers per scored token.

Sequences are ``batch`` x ``length`` token windows of agent-like text. ``naive`` materialises
[B, T, V] logits and a full log-softmax, as a plain implementation would; ``chunked`` runs the
decoder once and applies the LM head and log-softmax to ``chunk_size`` positions at a time.
Peak memory above the loaded model (``*_extra_peak_mb``) is measured in a fresh process each.
Wire bytes per scored token: our request (the token-id prompt as JSON) and vLLM's
``prompt_logprobs`` answer (top-0 and top-5), against a plain JSON list of floats and raw
float32. Usage::

    python -m bench.teacher [quick] [server=http://127.0.0.1:8000]

Without ``server=``, the full run starts its own CPU server (``scripts/vllm_cpu.py``; about
2 minutes), or skips it with the reason when the vLLM venv is missing (``make vllm-cpu``);
quick mode skips the server. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import socket
import statistics
import time

import anyio
import httpx
import torch

from bench.common import (
    context,
    in_fresh_process,
    log,
    peak_rss_mb,
    run_main,
    vllm_cpu_script,
    vllm_unavailable,
)
from training import models
from training.teachers import LocalTeacher, VLLMServerTeacher
from training.types import ScoreRequest
from training.vllm_http import scoring_payload

SERVED_NAME = "smollm2-135m-instruct"


def _sequences(tokenizer, batch: int, length: int) -> list[list[int]]:
    text = " ".join(
        f"Step {i}: the agent runs `ls -la /app/src/module_{i}` and reads {i * 7} lines of "
        f"output, then writes a short note about what it found in file_{i}.py."
        for i in range(400)
    )
    ids = tokenizer.encode(text)
    return [ids[i * 37 : i * 37 + length] for i in range(batch)]


def _naive(model, sequences: list[list[int]]) -> None:
    with torch.no_grad():
        ids = torch.tensor(sequences)
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)
        logprobs[:, :-1].gather(-1, ids[:, 1:, None])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _score_once(method: str, dtype: str, batch: int, length: int) -> float:
    """Load the model, score once with ``method`` (``load``: not at all); the peak RSS (run it
    in a fresh process)."""
    model, tokenizer = models.load_frozen(models.EMBEDDED_MODEL, dtype=dtype, device="cpu")
    sequences = _sequences(tokenizer, batch, length)
    if method == "naive":
        _naive(model, sequences)
    elif method == "chunked":
        LocalTeacher(model, chunk_size=1024).score_sync([ScoreRequest(s) for s in sequences])
    return peak_rss_mb()


def _local(sequences, quick: bool) -> dict[str, float]:
    tokens = sum(len(s) for s in sequences)
    out: dict[str, float] = {}
    for dtype in ["bf16"] if quick else ["fp32", "bf16"]:
        model, _ = models.load_frozen(models.EMBEDDED_MODEL, dtype=dtype, device="cpu")
        teacher = LocalTeacher(model, chunk_size=1024)
        requests = [ScoreRequest(s) for s in sequences]
        teacher.score_sync(requests[:1])  # warm-up
        runs = [  # interleaved, so load changes on a shared machine hit both alike
            (
                _timed(lambda t=teacher, r=requests: t.score_sync(r)),
                _timed(lambda m=model: _naive(m, sequences)),
            )
            for _ in range(1 if quick else 3)
        ]
        out[f"local_chunked_{dtype}_tok_s"] = tokens / statistics.median(r[0] for r in runs)
        out[f"local_naive_{dtype}_tok_s"] = tokens / statistics.median(r[1] for r in runs)
        batch, length = len(sequences), len(sequences[0])
        base = in_fresh_process(_score_once, "load", dtype, batch, length)
        for method in ("chunked", "naive"):
            peak = in_fresh_process(_score_once, method, dtype, batch, length)
            out[f"local_{method}_{dtype}_extra_peak_mb"] = peak - base
        log("teacher", f"{dtype} {out}")
    return {k: round(v, 1) for k, v in out.items()}


async def _server(url: str, sequences, repeats: int) -> dict[str, float]:
    tokens = sum(len(s) for s in sequences)
    teacher = VLLMServerTeacher(url, SERVED_NAME, max_concurrency=len(sequences))
    requests = [ScoreRequest(s) for s in sequences]
    await teacher.score(requests[:1])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await teacher.score(requests)
        times.append(time.perf_counter() - start)
    await teacher.close()
    first = sequences[0]
    request = json.dumps(scoring_payload(SERVED_NAME, first, 0))
    wire = {"request_json_bytes_per_token": len(request) / len(first)}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for k in (0, 5):
            answer = await client.post(
                "/v1/completions", json=scoring_payload(SERVED_NAME, first, k)
            )
            wire[f"vllm_json_top{k}_bytes_per_token"] = len(answer.content) / len(first)
    floats = torch.randn(len(sequences[0])).tolist()
    wire["plain_json_floats_bytes_per_token"] = len(json.dumps(floats)) / len(floats)
    wire["float32_bytes_per_token"] = 4.0
    return {"vllm_server_bf16_tok_s": round(tokens / statistics.median(times), 1)} | {
        k: round(v, 1) for k, v in wire.items()
    }


def _start_server():
    script = vllm_cpu_script()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process, url = script.start(
        models.embedded_model_dir(), port, served_model_name=SERVED_NAME, max_model_len=2048
    )
    return script, process, url


def main(quick: bool = False, server: str | None = None) -> dict:
    result = context("teacher", quick)
    tokenizer = models.load_tokenizer(models.EMBEDDED_MODEL)
    batch, length = (2, 128) if quick else (8, 512)
    sequences = _sequences(tokenizer, batch, length)
    result |= {"batch": batch, "length": length}
    result |= _local(sequences, quick)
    if server is not None:
        result |= anyio.run(_server, server, sequences, 1 if quick else 3)
    elif quick:
        result["server_skipped"] = "quick mode starts no vLLM server (pass server=URL)"
    elif (problem := vllm_unavailable()) is not None:
        result["server_skipped"] = problem
    else:
        script, process, url = _start_server()
        try:
            result |= anyio.run(_server, url, sequences, 3)
        finally:
            script.stop(process)
    return result


if __name__ == "__main__":
    run_main(main)
