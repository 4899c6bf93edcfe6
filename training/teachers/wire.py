"""The wire format of our teacher server (``teachers.server``, ``teachers.remote``), version 1.

Only the positions the student needs travel back, as raw little-endian numbers, so an answer
costs 4 bytes per scored token at top-0 and ``4 + 8K`` at top-K (vLLM's ``prompt_logprobs``
JSON: ~74 and ~350 bytes).

**Request**: ``POST /v1/score`` with a JSON body (readable, curl-able)::

    {"requests": [{"tokens": [1, 2, 3, 4], "top_k": 5, "positions": [[2, 4]]}, ...]}

- ``tokens``: at least one token id, each in ``[0, vocab_size)``.
- ``top_k`` (default 0): how many of the teacher's most likely tokens to return per position.
- ``positions`` (optional): the positions to score as half-open spans ``[start, end)`` with
  ``0 <= start < end <= len(tokens)``; omitted or ``null``: every position. ``[]`` scores none.
  Position 0 is never scored (nothing conditions it).

A request's *scored positions* are the positions ``t >= 1`` that its spans cover, in
increasing order; ``n`` is their count.

**Answer** (``200``, ``Content-Type: application/octet-stream``), little-endian, every field
4-byte aligned::

    header    4 bytes  magic b"APSC"
              uint16   version (1)
              uint16   reserved (0)
              uint32   number of requests (as sent)
    then per request, in the order sent:
              uint32   n (scored positions)
              uint32   k (its top_k)
              float32  [n]      logprob of the token at each scored position
              int32    [n, k]   top-k token ids, most likely first      (only when k > 0)
              float32  [n, k]   their logprobs                          (only when k > 0)

The decoder rebuilds [T] and [T, k] tensors with 0 at the positions not scored (as
``LocalTeacher`` does) and checks the magic, the version, every count against its request and
the total length. Errors are JSON ``{"error": "..."}``: 400 for a bad request (the message names
the field, e.g. ``requests[0].tokens[3]``), 500 when scoring fails. ``GET /health`` answers
``{"status": "ok", "model", "format": "apprentice-scores", "version", "vocab_size"}``.

Full-vocabulary logits do not travel (T x V x 4 bytes: 100 MB for 512 SmolLM2 tokens): full-
vocabulary losses need a ``LocalTeacher``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.types import ScoreRequest, TeacherScores

FORMAT = "apprentice-scores"
VERSION = 1
MAGIC = b"APSC"
CONTENT_TYPE = "application/octet-stream"
SCORE_PATH = "/v1/score"
HEALTH_PATH = "/health"

_HEADER = struct.Struct("<4sHHI")
_REQUEST_HEADER = struct.Struct("<II")
_F32 = np.dtype("<f4")
_I32 = np.dtype("<i4")


class WireFormatError(ValueError):
    """An answer that is not ours, is truncated, or does not match its request."""


class BadRequestError(ValueError):
    """A request body the server cannot score; the message names the field."""


# ---- positions -------------------------------------------------------------------------------


def to_spans(positions: Sequence[bool]) -> list[list[int]]:
    """A per-token mask as half-open ``[start, end)`` spans of True entries."""
    edges = np.diff(np.concatenate([[0], np.asarray(positions, dtype=np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(s), int(e)] for s, e in zip(starts, ends, strict=True)]


def from_spans(spans: Sequence[Sequence[int]], length: int) -> list[bool]:
    """Spans (already checked to lie within ``length``) as a per-token mask."""
    mask = np.zeros(length, dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    return mask.tolist()


def scored_positions(request: ScoreRequest) -> np.ndarray:
    """The positions an answer carries for ``request``: covered by ``positions`` (empty: all),
    never 0. Same rule as ``LocalTeacher``."""
    length = len(request.tokens)
    if not request.positions:
        return np.arange(1, length)
    if len(request.positions) != length:
        raise ValueError(
            f"ScoreRequest.positions has {len(request.positions)} entries for {length} tokens; "
            "expected one per token"
        )
    wanted = np.flatnonzero(np.asarray(request.positions, dtype=bool))
    return wanted[wanted > 0]


# ---- request ---------------------------------------------------------------------------------


def encode_request(requests: Sequence[ScoreRequest]) -> dict[str, Any]:
    """The JSON body of ``POST /v1/score``."""
    items = []
    for request in requests:
        scored_positions(request)  # checks the length of positions
        item: dict[str, Any] = {"tokens": list(request.tokens), "top_k": request.top_k}
        if request.positions:
            item["positions"] = to_spans(request.positions)
        items.append(item)
    return {"requests": items}


def decode_request(body: Any, vocab_size: int | None = None) -> list[ScoreRequest]:
    """The server's side: a parsed JSON body -> requests, or ``BadRequestError`` naming the
    field and what was expected."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BadRequestError('body: expected a JSON object {"requests": [...]}')
    if unknown := sorted(set(body) - {"requests"}):
        raise BadRequestError(f"body: unknown field(s) {unknown}; expected only 'requests'")
    return [_decode_item(i, item, vocab_size) for i, item in enumerate(body["requests"])]


def _decode_item(index: int, item: Any, vocab_size: int | None) -> ScoreRequest:
    where = f"requests[{index}]"
    if not isinstance(item, dict):
        raise BadRequestError(f"{where}: expected an object with tokens, top_k, positions")
    if "full_logits" in item:
        raise BadRequestError(
            f"{where}.full_logits: full-vocabulary logits are not served (T x V floats per "
            "sequence); ask for top_k, or score with a LocalTeacher"
        )
    if unknown := sorted(set(item) - {"tokens", "top_k", "positions"}):
        raise BadRequestError(
            f"{where}: unknown field(s) {unknown}; expected tokens, top_k, positions"
        )
    tokens = item.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise BadRequestError(f"{where}.tokens: expected a non-empty list of token ids")
    bad = next((j for j, v in enumerate(tokens) if type(v) is not int), None)
    if bad is not None:
        raise BadRequestError(f"{where}.tokens[{bad}]: expected an integer id, got {tokens[bad]!r}")
    high = vocab_size if vocab_size is not None else 2**31
    if min(tokens) < 0 or max(tokens) >= high:
        bad = next(j for j, v in enumerate(tokens) if not 0 <= v < high)
        raise BadRequestError(
            f"{where}.tokens[{bad}]: id {tokens[bad]} is outside the teacher's vocabulary "
            f"[0, {high})"
        )
    top_k = item.get("top_k", 0)
    if type(top_k) is not int or not 0 <= top_k <= high:
        raise BadRequestError(f"{where}.top_k: expected an integer in [0, {high}], got {top_k!r}")
    spans = item.get("positions")
    positions: list[bool] = []
    if spans is not None:
        if not isinstance(spans, list):
            raise BadRequestError(f"{where}.positions: expected a list of [start, end) spans")
        for j, span in enumerate(spans):
            ok = (
                isinstance(span, list)
                and len(span) == 2
                and all(type(v) is int for v in span)
                and 0 <= span[0] < span[1] <= len(tokens)
            )
            if not ok:
                raise BadRequestError(
                    f"{where}.positions[{j}]: expected [start, end) with 0 <= start < end <= "
                    f"{len(tokens)} (the number of tokens), got {span!r}"
                )
        positions = from_spans(spans, len(tokens))  # never empty: tokens are not
    return ScoreRequest(tokens=tokens, positions=positions, top_k=top_k)


# ---- answer ----------------------------------------------------------------------------------


def encode_scores(requests: Sequence[ScoreRequest], scores: Sequence[TeacherScores]) -> bytes:
    """The server's answer body for ``scores`` of ``requests``."""
    parts = [_HEADER.pack(MAGIC, VERSION, 0, len(requests))]
    for request, score in zip(requests, scores, strict=True):
        wanted = torch.from_numpy(scored_positions(request))
        k = request.top_k
        parts.append(_REQUEST_HEADER.pack(len(wanted), k))
        parts.append(score.logprobs[wanted].numpy().astype(_F32).tobytes())
        if k:
            if score.topk_ids is None or score.topk_logprobs is None:
                raise ValueError(f"the teacher returned no top-{k} alternatives")
            parts.append(score.topk_ids[wanted, :k].numpy().astype(_I32).tobytes())
            parts.append(score.topk_logprobs[wanted, :k].numpy().astype(_F32).tobytes())
    return b"".join(parts)


def decode_scores(payload: bytes, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
    """The client's side: an answer body -> one ``TeacherScores`` per request, or
    ``WireFormatError`` saying what was expected and what came."""
    if len(payload) < _HEADER.size:
        raise WireFormatError(
            f"answer of {len(payload)} bytes is shorter than the {_HEADER.size}-byte header"
        )
    magic, version, _, count = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise WireFormatError(
            f"answer starts with {payload[:4]!r}, expected the magic {MAGIC!r} (not an "
            f"{FORMAT} payload: is this URL our teacher server?)"
        )
    if version != VERSION:
        raise WireFormatError(f"answer is {FORMAT} version {version}; this client reads {VERSION}")
    if count != len(requests):
        raise WireFormatError(f"answer holds {count} requests, expected {len(requests)}")
    offset = _HEADER.size
    out = []
    for i, request in enumerate(requests):
        wanted = scored_positions(request)
        n, k = len(wanted), request.top_k
        if len(payload) < offset + _REQUEST_HEADER.size:
            raise WireFormatError(
                f"answer is truncated in request {i}: needs {offset + _REQUEST_HEADER.size} "
                f"bytes, has {len(payload)}"
            )
        got_n, got_k = _REQUEST_HEADER.unpack_from(payload, offset)
        if (got_n, got_k) != (n, k):
            raise WireFormatError(
                f"request {i}: answer has {got_n} positions x top-{got_k}, expected {n} x top-{k}"
            )
        offset += _REQUEST_HEADER.size
        size = 4 * n * (1 + 2 * k)
        if len(payload) < offset + size:
            raise WireFormatError(
                f"answer is truncated in request {i}: needs {offset + size} bytes, has "
                f"{len(payload)}"
            )
        length = len(request.tokens)
        index = torch.from_numpy(wanted)
        logprobs = torch.zeros(length)
        logprobs[index] = _tensor(payload, _F32, n, offset)
        offset += 4 * n
        scores = TeacherScores(logprobs=logprobs)
        if k:
            scores.topk_ids = torch.zeros((length, k), dtype=torch.long)
            scores.topk_ids[index] = _tensor(payload, _I32, n * k, offset).long().view(n, k)
            offset += 4 * n * k
            scores.topk_logprobs = torch.zeros((length, k))
            scores.topk_logprobs[index] = _tensor(payload, _F32, n * k, offset).view(n, k)
            offset += 4 * n * k
        out.append(scores)
    if offset != len(payload):
        raise WireFormatError(
            f"answer has {len(payload) - offset} bytes after the last request ({offset} expected)"
        )
    return out


def _tensor(payload: bytes, dtype: np.dtype, count: int, offset: int) -> torch.Tensor:
    values = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))
