"""Score sequences with a local Hugging Face model, without materialising B x T x V logits.

The decoder runs once per batch to hidden states [B, T, H]; the LM head and log-softmax are
then applied to chunks of the positions that need an answer, so peak memory holds
``chunk_size x V`` logits instead of ``B x T x V`` (for SmolLM2, 8 x 512 positions would be
800 MB of fp32 logits; a 1024-position chunk is 200 MB). ``full_logits`` on a request asks for
its [T, V] logits anyway (full-vocabulary losses): T x V x 4 bytes per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import anyio.lowlevel
import torch

from training.types import ScoreRequest, TeacherScores


class LocalTeacher:
    """A frozen HF causal LM as a ``Teacher``. Requests are packed into batches of at most
    ``max_batch_tokens`` padded tokens, similar lengths together."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        name: str | None = None,
        chunk_size: int = 1024,
        max_batch_tokens: int = 8192,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", "local")
        self.chunk_size = chunk_size
        self.max_batch_tokens = max_batch_tokens
        self._lock = anyio.Lock()

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
        """Scores on the event loop's thread, with a checkpoint between batches: a worker
        thread would run its own OpenMP team beside the trainer's, which on a few CPU cores
        makes both slower (see ``training.samplers.hf``)."""
        async with self._lock:
            requests = list(requests)
            results: list[TeacherScores | None] = [None] * len(requests)
            for _ in self._score_batches(requests, results):
                await anyio.lowlevel.checkpoint()
            return results  # type: ignore[return-value]

    async def close(self) -> None:
        return None

    def score_sync(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
        """Blocking ``score``."""
        requests = list(requests)
        results: list[TeacherScores | None] = [None] * len(requests)
        for _ in self._score_batches(requests, results):
            pass
        return results  # type: ignore[return-value]

    def _score_batches(
        self, requests: list[ScoreRequest], results: list[TeacherScores | None]
    ) -> Iterator[None]:
        """Fill ``results``, one batch per step (yields before each batch)."""
        for batch in _batches(requests, self.max_batch_tokens):
            yield
            for index, scores in zip(
                batch, self._score_batch([requests[i] for i in batch]), strict=True
            ):
                results[index] = scores

    @torch.no_grad()
    def _score_batch(self, requests: list[ScoreRequest]) -> list[TeacherScores]:
        model = self.model
        device = next(model.parameters()).device
        width = max(len(r.tokens) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(requests):
            ids[i, : len(request.tokens)] = torch.tensor(request.tokens)
            mask[i, : len(request.tokens)] = 1
        was_training = model.training
        model.eval()
        try:
            hidden = model.get_decoder()(
                input_ids=ids.to(device), attention_mask=mask.to(device)
            ).last_hidden_state
        finally:
            if was_training:
                model.train()
        head = model.get_output_embeddings()
        out = []
        for i, request in enumerate(requests):
            out.append(self._score_row(hidden[i], request, head))
        return out

    def _score_row(
        self, hidden: torch.Tensor, request: ScoreRequest, head: torch.nn.Module
    ) -> TeacherScores:
        """``hidden`` [T_padded, H]; position t is scored from the hidden state at t - 1."""
        length = len(request.tokens)
        wanted = _positions(request, length)
        logprobs = torch.zeros(length)
        k = request.top_k
        topk_ids = torch.zeros((length, k), dtype=torch.long) if k else None
        topk_logprobs = torch.zeros((length, k)) if k else None
        full = torch.zeros((length, head.weight.shape[0])) if request.full_logits else None
        targets = torch.tensor(request.tokens, device=hidden.device)
        for start in range(0, len(wanted), self.chunk_size):
            pos = wanted[start : start + self.chunk_size].to(hidden.device)
            logits = self._logits(head, hidden[pos - 1])  # [chunk, V] float32
            lse = torch.logsumexp(logits, dim=-1)
            chosen = logits.gather(-1, targets[pos][:, None])[:, 0] - lse
            logprobs[pos.cpu()] = chosen.cpu()
            if k:
                values, index = logits.topk(k, dim=-1)
                topk_ids[pos.cpu()] = index.cpu()
                topk_logprobs[pos.cpu()] = (values - lse[:, None]).cpu()
            if full is not None:
                full[pos.cpu()] = logits.cpu()
        return TeacherScores(
            logprobs=logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs, full_logits=full
        )

    def _logits(self, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


def _positions(request: ScoreRequest, length: int) -> torch.Tensor:
    """Positions to score (never 0: nothing conditions it). Empty ``positions`` = all."""
    if request.positions:
        if len(request.positions) != length:
            raise ValueError(
                f"ScoreRequest.positions has {len(request.positions)} entries for "
                f"{length} tokens; expected one per token"
            )
        wanted = [t for t, on in enumerate(request.positions) if on and t > 0]
    else:
        wanted = list(range(1, length))
    return torch.tensor(wanted, dtype=torch.long)


def _batches(requests: Sequence[ScoreRequest], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each group's padded size within ``max_tokens``."""
    for i, request in enumerate(requests):
        if not request.tokens:
            raise ValueError(f"ScoreRequest {i} has no tokens")
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].tokens))
    batches: list[list[int]] = []
    for index in order:
        if batches and len(requests[index].tokens) * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches
