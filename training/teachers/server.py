"""Serve any ``Teacher`` over HTTP in our wire format (``teachers.wire``), so a frozen HF
teacher can run on another machine or process (a big-RAM box, a GPU box without vLLM) and the
trainer scores through ``RemoteTeacher``.

The app is starlette on uvicorn: ``GET /health`` and ``POST /v1/score``. The teacher is not
thread-safe and batches better than it runs one sequence at a time, so the requests of all
HTTP calls waiting at a given moment are scored together in one ``teacher.score`` call (which
a ``LocalTeacher`` packs into length-sorted batches); one call at a time.

Start one from the command line with ``python -m recipes.serve_teacher``; from Python with
``serve`` (blocking, stops on Ctrl-C/SIGTERM) or ``serve_in_thread`` (tests, notebooks).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from training.teachers.wire import (
    CONTENT_TYPE,
    FORMAT,
    HEALTH_PATH,
    SCORE_PATH,
    VERSION,
    BadRequestError,
    decode_request,
    encode_scores,
)
from training.types import ScoreRequest, Teacher, TeacherScores

log = logging.getLogger(__name__)


def create_app(teacher: Teacher, *, vocab_size: int | None = None) -> Starlette:
    """The ASGI app. ``vocab_size`` bounds the token ids accepted (default: the model's, for a
    teacher that has ``model.config.vocab_size``, such as ``LocalTeacher``)."""
    if vocab_size is None:
        config = getattr(getattr(teacher, "model", None), "config", None)
        vocab_size = getattr(config, "vocab_size", None)
    batcher = _Batcher(teacher)

    async def health(_: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": teacher.name,
                "format": FORMAT,
                "version": VERSION,
                "vocab_size": vocab_size,
            }
        )

    async def score(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as error:
            return _error(400, f"body: expected a JSON object ({error})")
        try:
            requests = decode_request(body, vocab_size)
        except BadRequestError as error:
            return _error(400, str(error))
        try:
            scores = await batcher.score(requests)
            payload = encode_scores(requests, scores)
        except Exception as error:
            log.exception("scoring failed")
            return _error(500, f"teacher {teacher.name!r} failed to score: {error!r}")
        return Response(payload, media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route(HEALTH_PATH, health, methods=["GET"]),
            Route(SCORE_PATH, score, methods=["POST"]),
        ]
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@dataclass(eq=False)
class _Job:
    requests: list[ScoreRequest]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: list[TeacherScores] = field(default_factory=list)
    error: Exception | None = None


class _Batcher:
    """Whoever holds the lock scores every job waiting then (its own and others'); a job
    finished by someone else's batch returns without scoring."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self._lock = anyio.Lock()
        self._pending: list[_Job] = []

    async def score(self, requests: Sequence[ScoreRequest]) -> list[TeacherScores]:
        job = _Job(list(requests))
        self._pending.append(job)
        try:
            async with self._lock:
                if not job.done.is_set():
                    batch, self._pending = self._pending, []
                    await self._run(batch, job)
        except BaseException:  # cancelled while waiting: nobody needs its scores
            if job in self._pending:
                self._pending.remove(job)
            raise
        if job.error is not None:
            raise job.error
        return job.result

    async def _run(self, batch: list[_Job], mine: _Job) -> None:
        try:
            scores = await self.teacher.score([r for job in batch for r in job.requests])
        except Exception as error:
            for job in batch:
                job.error = error
                job.done.set()
            return
        except BaseException:  # cancelled while scoring: the others go to the next holder
            self._pending[:0] = [job for job in batch if job is not mine]
            raise
        start = 0
        for job in batch:
            job.result = scores[start : start + len(job.requests)]
            start += len(job.requests)
            job.done.set()


# ---- running it ------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, telling ``on_ready`` the URL once its sockets accept connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        if self.config.host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        self.on_ready(f"http://{host}:{port}")


def _server(
    teacher: Teacher, host: str, port: int, vocab_size: int | None, on_ready: Callable[[str], None]
) -> _Server:
    config = uvicorn.Config(
        create_app(teacher, vocab_size=vocab_size),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    return _Server(config, on_ready)


def serve(
    teacher: Teacher,
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    vocab_size: int | None = None,
    on_ready: Callable[[str], None] = lambda url: None,
) -> None:
    """Serve until Ctrl-C or SIGTERM (then finish the calls in flight and return). ``port=0``
    picks a free port; ``on_ready`` gets the URL."""
    _server(teacher, host, port, vocab_size, on_ready).run()


@contextlib.contextmanager
def serve_in_thread(
    teacher: Teacher,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    vocab_size: int | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Serve from a background thread while the block runs; yields the URL, and always stops
    the server. The teacher then runs on that thread: do not score with it elsewhere at the
    same time."""
    ready: list[str] = []
    server = _server(teacher, host, port, vocab_size, ready.append)
    thread = threading.Thread(target=server.run, name="teacher-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready:
            if not thread.is_alive():
                raise RuntimeError(f"the teacher server on {host}:{port} failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the teacher server on {host}:{port} did not start in time")
            time.sleep(0.01)
        yield ready[0]
    finally:
        server.should_exit = True
        thread.join()
