"""A teacher behind our own teacher server (``teachers.server``, started with
``python -m recipes.serve_teacher``): token ids go out as JSON, scores come back as raw
float32/int32 (``teachers.wire``)."""

from __future__ import annotations

from collections.abc import Sequence

from training.errors import TeacherServerError
from training.teachers.wire import SCORE_PATH, WireFormatError, decode_scores, encode_request
from training.types import ScoreRequest, TeacherScores
from training.vllm_http import CompletionsClient

SERVE_HINT = (
    "Start one with `python -m recipes.serve_teacher model=MODEL port=N` on the teacher's "
    "machine, or point base_url at a running one."
)


class RemoteTeacher:
    """Each ``score`` call is one ``POST /v1/score`` (the server scores the sequences of all
    calls waiting together); up to ``max_concurrency`` calls are in flight.

    Connection errors, timeouts, 429 and 5xx are retried ``max_attempts`` times with
    exponential backoff; then, like a 4xx or an answer that is not ours, a
    ``TeacherServerError`` (an ``EnvironmentFailure``) names the URL."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        timeout_s: float = 600.0,
    ) -> None:
        self.client = CompletionsClient(
            base_url,
            what="teacher server",
            error_type=TeacherServerError,
            max_concurrency=max_concurrency,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
            hint=SERVE_HINT,
        )
        self.name = name or self.client.base_url

    @property
    def base_url(self) -> str:
        return self.client.base_url

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
        requests = list(requests)
        if not requests:
            return []
        if any(r.full_logits for r in requests):
            raise ValueError(
                f"teacher {self.name!r} (our teacher server at {self.base_url}) cannot return "
                "full_logits; use top_k for a remote teacher or a LocalTeacher for "
                "full-vocabulary losses"
            )
        payload = await self.client.post_bytes(SCORE_PATH, encode_request(requests))
        try:
            return decode_scores(payload, requests)
        except WireFormatError as error:
            raise TeacherServerError(
                f"teacher server at {self.base_url} answered POST {SCORE_PATH} with an unusable "
                f"payload: {error}"
            ) from error

    async def close(self) -> None:
        await self.client.aclose()
