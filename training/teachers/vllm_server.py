"""A teacher behind a vLLM OpenAI-compatible server (on a GPU, or the CPU one from
``scripts/vllm_cpu.py``): one prefill per sequence with ``prompt_logprobs``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from training.errors import TeacherServerError
from training.types import ScoreRequest, TeacherScores
from training.vllm_http import CompletionsClient, gather, parse_prompt_logprobs, scoring_payload


class VLLMServerTeacher:
    """Scores requests concurrently (``max_concurrency`` in flight; the server batches them).

    A dead or failing server raises ``TeacherServerError`` naming the URL after
    ``max_attempts`` tries with exponential backoff."""

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        name: str | None = None,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
    ) -> None:
        self.model_name = model_name
        self.name = name or model_name
        self.client = CompletionsClient(
            base_url,
            what="vLLM teacher",
            error_type=TeacherServerError,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
        )

    @property
    def base_url(self) -> str:
        return self.client.base_url

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
        return await gather([functools.partial(self._score_one, r) for r in requests])

    async def _score_one(self, request: ScoreRequest) -> TeacherScores:
        if request.full_logits:
            raise ValueError(
                f"teacher {self.name!r} (vLLM at {self.base_url}) cannot return full_logits; "
                "use top_k for a remote teacher or a LocalTeacher for full-vocabulary losses"
            )
        answer = await self.client.post(
            "/v1/completions", scoring_payload(self.model_name, request.tokens, request.top_k)
        )
        try:
            logprobs, alternatives = parse_prompt_logprobs(answer, request.tokens, request.top_k)
        except (KeyError, ValueError, TypeError) as error:
            raise TeacherServerError(
                f"vLLM teacher at {self.base_url} answered /v1/completions without usable "
                f"prompt_logprobs for model {self.model_name!r}: {error!r}"
            ) from error
        scores = TeacherScores(logprobs=torch.tensor(logprobs, dtype=torch.float32))
        if request.top_k:
            k = request.top_k
            ids = torch.zeros((len(logprobs), k), dtype=torch.long)
            values = torch.full((len(logprobs), k), -torch.inf)
            for t, ranked in enumerate(alternatives):
                for j, (token, value) in enumerate(ranked):
                    ids[t, j] = token
                    values[t, j] = value
            values[0] = 0.0
            scores.topk_ids, scores.topk_logprobs = ids, values
        return scores

    async def close(self) -> None:
        await self.client.aclose()
