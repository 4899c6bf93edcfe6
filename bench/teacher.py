"""Teacher scoring throughput on the embedded SmolLM2: the chunked ``LocalTeacher`` against a
naive full-logits pass (fp32 and bf16), our teacher server through ``RemoteTeacher`` against
the same ``LocalTeacher`` in this process, and the vLLM CPU server through
``VLLMServerTeacher``; plus the wire cost of the answers per scored token.

Sequences are ``batch`` x ``length`` token windows of agent-like text. ``naive`` materialises
[B, T, V] logits and a full log-softmax, as a plain implementation would; ``chunked`` runs the
decoder once and applies the LM head and log-softmax to ``chunk_size`` positions at a time.
Peak memory above the loaded model (``*_extra_peak_mb``) is measured in a fresh process each.

Our server (``python -m recipes.serve_teacher``, bf16 on CPU) runs in a subprocess started and
always stopped here, in quick mode too; ``RemoteTeacher`` and an in-process ``LocalTeacher``
score the same sequences, interleaved, so ``ours_remote_over_local`` is what HTTP, JSON and
the binary answer cost. Wire bytes per token of the first sequence (every position scored, as
vLLM does): our request (JSON token ids) and answer (``training.teachers.wire``) at top-0 and
top-5, and with only its last quarter scored (``positions``; ours sends only what was asked,
vLLM always answers every position); vLLM's request and ``prompt_logprobs`` answer (top-0 and
top-5); a plain JSON list of the same logprobs and raw float32. Usage::

    python -m bench.teacher [quick] [server=http://127.0.0.1:8000]

Without ``server=``, the full run starts its own vLLM CPU server (``scripts/vllm_cpu.py``;
about 2 minutes), or skips it with the reason when the vLLM venv is missing (``make
vllm-cpu``); quick mode skips the vLLM server. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import httpx
import torch

from bench.common import (
    REPO,
    context,
    in_fresh_process,
    log,
    reset_peak_rss,
    run_main,
    status_mb,
    vllm_cpu_script,
    vllm_unavailable,
)
from training import models
from training.teachers import LocalTeacher, RemoteTeacher, VLLMServerTeacher
from training.teachers.wire import SCORE_PATH, encode_request
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
    """Load the model, then score once with ``method``: how far resident memory peaked above
    what the loaded model held (run it in a fresh process). The kernel's peak mark (VmHWM) is
    reset after loading (``/proc/self/clear_refs``), so loading's own peak does not count."""
    model, tokenizer = models.load_frozen(models.EMBEDDED_MODEL, dtype=dtype, device="cpu")
    sequences = _sequences(tokenizer, batch, length)
    loaded = reset_peak_rss()
    if method == "naive":
        _naive(model, sequences)
    else:
        LocalTeacher(model, chunk_size=1024).score_sync([ScoreRequest(s) for s in sequences])
    return status_mb("VmHWM") - loaded


def _local(sequences, quick: bool) -> dict[str, float]:
    tokens = sum(len(s) for s in sequences)
    out: dict[str, float] = {}
    for dtype in ["bf16"] if quick else ["fp32", "bf16"]:
        model, _ = models.load_frozen(models.EMBEDDED_MODEL, dtype=dtype, device="cpu")
        teacher = LocalTeacher(model, chunk_size=1024)
        requests = [ScoreRequest(s) for s in sequences]
        teacher.score_sync(requests[:1])  # warm-up, both sides
        _naive(model, sequences[:1])
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
        for method in ("chunked", "naive"):
            extra = in_fresh_process(_score_once, method, dtype, batch, length)
            out[f"local_{method}_{dtype}_extra_peak_mb"] = extra
        log("teacher", f"{dtype} {out}")
    return {k: round(v, 1) for k, v in out.items()}


@contextmanager
def _our_server() -> Iterator[str]:
    """``python -m recipes.serve_teacher`` (the embedded model, bf16, CPU) on a free port, in
    its own process group; yields the URL; always stopped."""
    command = [sys.executable, "-m", "recipes.serve_teacher", "dtype=bf16", "device=cpu", "port=0"]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        for line in process.stdout:
            if " is serving at " in line:
                break
        else:
            raise RuntimeError(f"{' '.join(command)} exited ({process.wait()}) without serving")
        yield line.split(" is serving at ")[1].split()[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        process.stdout.close()


async def _ours(url: str, sequences, repeats: int) -> dict[str, float]:
    """``RemoteTeacher`` against ``LocalTeacher`` in this process (interleaved), and the bytes
    of our request and answers."""
    tokens = sum(len(s) for s in sequences)
    model, _ = models.load_frozen(models.EMBEDDED_MODEL, dtype="bf16", device="cpu")
    local = LocalTeacher(model, chunk_size=1024)
    remote = RemoteTeacher(url)
    requests = [ScoreRequest(s) for s in sequences]
    await remote.score(requests[:1])  # warm-up
    local.score_sync(requests[:1])
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        await remote.score(requests)
        middle = time.perf_counter()
        local.score_sync(requests)
        runs.append((middle - start, time.perf_counter() - middle))
    await remote.close()
    remote_s, local_s = (statistics.median(r[i] for r in runs) for i in (0, 1))
    out = {
        "ours_remote_bf16_tok_s": tokens / remote_s,
        "ours_local_bf16_tok_s": tokens / local_s,
        "ours_remote_over_local_time": remote_s / local_s,
    }
    first = sequences[0]
    quarter = [t >= len(first) * 3 // 4 for t in range(len(first))]
    asks = {
        "top0": ScoreRequest(first),
        "top5": ScoreRequest(first, top_k=5),
        "top0_last_quarter": ScoreRequest(first, positions=quarter),
    }
    out["ours_request_json_bytes_per_token"] = len(
        json.dumps(encode_request([asks["top0"]]))
    ) / len(first)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for name, ask in asks.items():
            answer = await client.post(SCORE_PATH, json=encode_request([ask]))
            answer.raise_for_status()
            scored = sum(quarter) if ask.positions else len(first)
            out[f"ours_{name}_bytes_per_token"] = len(answer.content) / scored
    out |= _plain(local.score_sync([asks["top0"]])[0].logprobs.tolist())
    log("teacher", f"ours {out}")
    return {k: round(v, 2) for k, v in out.items()}


def _plain(logprobs: list[float]) -> dict[str, float]:
    """The baselines of the wire figures: the logprobs as a plain JSON list, raw float32."""
    return {
        "plain_json_floats_bytes_per_token": len(json.dumps(logprobs)) / len(logprobs),
        "float32_bytes_per_token": 4.0,
    }


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
    with _our_server() as url:
        result |= anyio.run(_ours, url, sequences, 1 if quick else 3)
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
