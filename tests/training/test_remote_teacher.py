"""Our teacher server and its client: a real uvicorn server (in a thread, or the CLI in a
subprocess) wrapping a ``LocalTeacher``; ``RemoteTeacher`` must give exactly the local scores.
Also the wire format's round trip and checks, the server's 4xx/500 answers, a dead server, and
the recipe keys that build a ``RemoteTeacher``."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
import torch

from recipes.cli import ConfigError
from recipes.common import TeacherProtocol, load_student, load_teacher, single_teacher
from recipes.common import teacher_policy as make_teacher_policy
from recipes.distillation import on_policy
from recipes.distillation.multi_teacher import Config as MultiTeacherConfig
from tests.conftest import free_port
from training.errors import TeacherServerError
from training.teachers import LocalTeacher, RemoteTeacher, wire
from training.teachers.server import _Batcher, serve_in_thread
from training.types import ScoreRequest, TeacherScores

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server_model(make_tiny_model):
    """The server's own copy of the tiny model (same weights as ``tiny_model``), so the
    server's thread and the test never run one module at the same time."""
    return make_tiny_model()


@pytest.fixture(scope="module")
def url(server_model):
    with serve_in_thread(LocalTeacher(server_model, chunk_size=16)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, make_tiny_model, smollm2_tokenizer) -> str:
    folder = tmp_path_factory.mktemp("tiny-teacher")
    make_tiny_model().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return str(folder)


def mixed_requests(tokenizer) -> list[ScoreRequest]:
    long = tokenizer.encode("def add(a, b):\n    return a + b\n" * 6)
    short = tokenizer.encode("ls -la /app")
    return [
        ScoreRequest(long),
        ScoreRequest(short, top_k=5),
        ScoreRequest(long, positions=[t % 3 != 1 for t in range(len(long))], top_k=3),
        ScoreRequest(short, positions=[False] * len(short), top_k=2),  # nothing to score
        ScoreRequest(short[:1], top_k=4),  # one token: only position 0
    ]


def assert_same(got: TeacherScores, expected: TeacherScores) -> None:
    assert torch.equal(got.logprobs, expected.logprobs)
    if expected.topk_ids is None:
        assert got.topk_ids is None and got.topk_logprobs is None
    else:
        assert got.topk_ids.dtype == torch.long
        assert torch.equal(got.topk_ids, expected.topk_ids)
        assert torch.equal(got.topk_logprobs, expected.topk_logprobs)


# ---- the main path ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_remote_scores_equal_local_ones_exactly(url, tiny_model, smollm2_tokenizer):
    requests = mixed_requests(smollm2_tokenizer)
    expected = LocalTeacher(tiny_model, chunk_size=16).score_sync(requests)
    teacher = RemoteTeacher(url, name="tiny")
    try:
        got = await teacher.score(requests)
    finally:
        await teacher.close()
    assert len(got) == len(requests)
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)
    assert got[0].logprobs[1:].lt(0).all()  # real scores, not zeros
    masked = requests[2].positions
    assert all(got[2].logprobs[t] == 0.0 for t, on in enumerate(masked) if not on)


@pytest.mark.anyio
async def test_concurrent_calls_each_get_their_own_scores(url, tiny_model, smollm2_tokenizer):
    requests = mixed_requests(smollm2_tokenizer)
    local = LocalTeacher(tiny_model, chunk_size=16)
    teacher = RemoteTeacher(url, max_concurrency=4)
    results: dict[int, list[TeacherScores]] = {}

    async def one(i: int) -> None:
        results[i] = await teacher.score([requests[i]])

    try:
        async with anyio.create_task_group() as group:
            for i in range(len(requests)):
                group.start_soon(one, i)
    finally:
        await teacher.close()
    for i, request in enumerate(requests):
        # batched with other calls on the server: padding may move the last bits
        expected = local.score_sync([request])[0]
        torch.testing.assert_close(results[i][0].logprobs, expected.logprobs, atol=1e-5, rtol=0)
        if request.top_k:
            assert torch.equal(results[i][0].topk_ids[1:], expected.topk_ids[1:])


@pytest.mark.anyio
async def test_the_server_scores_the_calls_waiting_together():
    class SlowTeacher:
        """Scores token t as -t, slowly, recording each call's batch size."""

        name = "slow"

        def __init__(self) -> None:
            self.batches: list[int] = []

        async def score(self, requests):
            self.batches.append(len(requests))
            await anyio.sleep(0.05)
            return [TeacherScores(-torch.tensor(r.tokens, dtype=torch.float)) for r in requests]

        async def close(self) -> None:
            pass

    teacher = SlowTeacher()
    batcher = _Batcher(teacher)
    answers: dict[int, list[TeacherScores]] = {}

    async def call(i: int) -> None:
        answers[i] = await batcher.score([ScoreRequest([i, i + 1])] * (i + 1))

    async with anyio.create_task_group() as group:
        group.start_soon(call, 0)
        await anyio.sleep(0.01)  # 0 is being scored while 1 and 2 arrive
        group.start_soon(call, 1)
        group.start_soon(call, 2)
    assert teacher.batches == [1, 5]  # call 0 alone, then calls 1 and 2 in one teacher call
    for i in range(3):
        assert len(answers[i]) == i + 1
        assert all(a.logprobs.tolist() == [-i, -i - 1] for a in answers[i])


# ---- the wire format -------------------------------------------------------------------------


def test_requests_round_trip_through_json(smollm2_tokenizer):
    requests = mixed_requests(smollm2_tokenizer)
    body = wire.encode_request(requests)
    assert body["requests"][1] == {"tokens": requests[1].tokens, "top_k": 5}  # no positions
    assert body["requests"][3]["positions"] == []  # scores none, unlike "omitted" (all)
    decoded = wire.decode_request(body, vocab_size=len(smollm2_tokenizer))
    for got, sent in zip(decoded, requests, strict=True):
        assert (got.tokens, got.positions, got.top_k) == (sent.tokens, sent.positions, sent.top_k)
    assert wire.to_spans([False, True, True, False, True]) == [[1, 3], [4, 5]]
    assert wire.from_spans([[1, 3], [4, 5]], 5) == [False, True, True, False, True]


def random_scores(request: ScoreRequest) -> TeacherScores:
    """Values at the scored positions only (zeros elsewhere, as a local teacher has them)."""
    length, k = len(request.tokens), request.top_k
    scores = TeacherScores(logprobs=torch.zeros(length))
    wanted = torch.from_numpy(wire.scored_positions(request))
    scores.logprobs[wanted] = -torch.rand(len(wanted)) * 10
    if k:
        scores.topk_ids = torch.zeros((length, k), dtype=torch.long)
        scores.topk_ids[wanted] = torch.randint(0, 49152, (len(wanted), k))
        scores.topk_logprobs = torch.zeros((length, k))
        scores.topk_logprobs[wanted] = -torch.rand(len(wanted), k) * 10
    return scores


def test_scores_round_trip_through_bytes(smollm2_tokenizer):
    torch.manual_seed(0)
    requests = mixed_requests(smollm2_tokenizer)
    scores = [random_scores(r) for r in requests]
    payload = wire.encode_scores(requests, scores)
    sizes = [len(wire.scored_positions(r)) * 4 * (1 + 2 * r.top_k) for r in requests]
    assert len(payload) == 12 + 8 * len(requests) + sum(sizes)
    assert payload[:4] == b"APSC"
    for got, sent in zip(wire.decode_scores(payload, requests), scores, strict=True):
        assert_same(got, sent)


def test_truncated_or_foreign_payloads_are_clear_errors(smollm2_tokenizer):
    requests = mixed_requests(smollm2_tokenizer)
    payload = wire.encode_scores(requests, [random_scores(r) for r in requests])
    cases = {
        payload[:-4]: r"truncated in request 4: needs \d+ bytes, has \d+",
        payload[:10]: "shorter than the 12-byte header",
        payload + b"\0\0\0\0": "4 bytes after the last request",
        b'{"choices": [{"prompt_logprobs": null}]}': r"magic b'APSC' \(not an apprentice-scores",
        payload[:4] + b"\x02" + payload[5:]: "version 2; this client reads 1",
    }
    for bad, message in cases.items():
        with pytest.raises(wire.WireFormatError, match=message):
            wire.decode_scores(bad, requests)
    with pytest.raises(wire.WireFormatError, match="holds 5 requests, expected 4"):
        wire.decode_scores(payload, requests[:4])
    with pytest.raises(wire.WireFormatError, match=r"request 0: answer has \d+ positions x top-0"):
        wire.decode_scores(payload, [requests[1], *requests[1:]])


@contextlib.contextmanager
def foreign_server():
    """A real HTTP server that answers every POST with vLLM-like JSON."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"choices": [{"prompt_logprobs": null}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.anyio
async def test_a_server_that_is_not_ours_is_a_teacher_server_error():
    with foreign_server() as foreign:
        teacher = RemoteTeacher(foreign, max_attempts=1)
        try:
            with pytest.raises(TeacherServerError) as error:
                await teacher.score([ScoreRequest([1, 2, 3])])
        finally:
            await teacher.close()
    assert f"teacher server at {foreign} answered POST /v1/score with an unusable" in str(
        error.value
    )
    assert "expected the magic b'APSC'" in str(error.value)


# ---- the server's errors ---------------------------------------------------------------------


BAD_REQUESTS = [
    ({"requests": [{"tokens": [1, "a", 3]}]}, "requests[0].tokens[1]: expected an integer id"),
    ({"requests": [{"tokens": [1, 2.5]}]}, "requests[0].tokens[1]: expected an integer id"),
    ({"requests": [{"tokens": [1, 49152]}]}, "requests[0].tokens[1]: id 49152 is outside the"),
    ({"requests": [{"tokens": [-1]}]}, "requests[0].tokens[0]: id -1 is outside the teacher's"),
    ({"requests": [{"tokens": []}]}, "requests[0].tokens: expected a non-empty list"),
    ({"requests": [{"tokens": [1], "top_k": -1}]}, "requests[0].top_k: expected an integer in"),
    (
        {"requests": [{"tokens": [1, 2]}, {"tokens": [1, 2], "positions": [[0, 3]]}]},
        "requests[1].positions[0]: expected [start, end) with 0 <= start < end <= 2",
    ),
    ({"requests": [{"tokens": [1], "full_logits": True}]}, "requests[0].full_logits: full-voc"),
    ({"requests": [{"tokens": [1], "topk": 2}]}, "requests[0]: unknown field(s) ['topk']"),
    ({"tokens": [1, 2]}, 'body: expected a JSON object {"requests": [...]}'),
]


def test_bad_requests_get_400_naming_the_field(url):
    for body, message in BAD_REQUESTS:
        answer = httpx.post(f"{url}/v1/score", json=body, timeout=30)
        assert answer.status_code == 400, body
        assert message in answer.json()["error"], (body, answer.json())
    answer = httpx.post(f"{url}/v1/score", content=b"not json", timeout=30)
    assert answer.status_code == 400 and "body: expected a JSON object" in answer.json()["error"]


def test_health_names_the_model_and_format(url):
    assert httpx.get(f"{url}/health", timeout=30).json() == {
        "status": "ok",
        "model": "",  # the tiny model has no name_or_path
        "format": "apprentice-scores",
        "version": 1,
        "vocab_size": 49152,
    }


@pytest.mark.anyio
async def test_a_rejected_request_is_a_teacher_server_error_with_the_servers_message(url):
    teacher = RemoteTeacher(url, max_attempts=3, backoff_s=0.01)
    try:
        with pytest.raises(TeacherServerError) as error:
            await teacher.score([ScoreRequest([1, 2, 10**6])])
    finally:
        await teacher.close()
    message = str(error.value)
    assert f"teacher server at {url} rejected POST /v1/score with HTTP 400" in message
    assert "requests[0].tokens[2]: id 1000000 is outside the teacher's vocabulary" in message


@pytest.mark.anyio
async def test_a_failing_teacher_is_a_500_retried_then_an_error():
    class BrokenTeacher:
        name = "broken"
        calls = 0

        async def score(self, requests):
            BrokenTeacher.calls += 1
            raise RuntimeError("CUDA out of memory (simulated)")

        async def close(self) -> None:
            pass

    with serve_in_thread(BrokenTeacher(), vocab_size=100) as broken:
        answer = httpx.post(f"{broken}/v1/score", json={"requests": [{"tokens": [1, 2]}]})
        assert answer.status_code == 500
        assert answer.json()["error"] == (
            "teacher 'broken' failed to score: RuntimeError('CUDA out of memory (simulated)')"
        )
        teacher = RemoteTeacher(broken, max_attempts=2, backoff_s=0.01)
        try:
            with pytest.raises(TeacherServerError, match=r"failed after 2 attempts \(HTTP 500"):
                await teacher.score([ScoreRequest([1, 2])])
        finally:
            await teacher.close()
    assert BrokenTeacher.calls == 3


@pytest.mark.anyio
async def test_a_dead_server_is_a_clear_error_naming_the_url():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    teacher = RemoteTeacher(dead, max_attempts=3, backoff_s=0.01)
    try:
        with pytest.raises(TeacherServerError) as error:
            await teacher.score([ScoreRequest([1, 2, 3])])
    finally:
        await teacher.close()
    message = str(error.value)
    assert f"teacher server at {dead} is unreachable after 3 attempts (connection refused)" in (
        message
    )
    assert "python -m recipes.serve_teacher" in message
    assert error.value.kind == "teacher"  # an EnvironmentFailure: the episode is invalid


@pytest.mark.anyio
async def test_full_logits_are_refused_before_anything_is_sent():
    teacher = RemoteTeacher(f"http://127.0.0.1:{free_port()}", name="big-teacher")
    try:
        with pytest.raises(ValueError) as error:
            await teacher.score([ScoreRequest([1, 2]), ScoreRequest([1, 2], full_logits=True)])
    finally:
        await teacher.close()
    message = str(error.value)
    assert "teacher 'big-teacher'" in message and "cannot return full_logits" in message
    assert "use top_k" in message and "LocalTeacher" in message


# ---- the command line ------------------------------------------------------------------------


@contextlib.contextmanager
def cli_server(*args: str):
    """``python -m recipes.serve_teacher`` in its own process group; yields (process, URL);
    always killed at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "recipes.serve_teacher", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " is serving at " in line:
                yield process, line.split(" is serving at ")[1].split()[0]
                return
        raise AssertionError("the server printed no URL:\n" + "".join(lines))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()


def test_the_cli_serves_and_stops_cleanly_on_sigterm(tiny_folder, tiny_model, smollm2_tokenizer):
    with cli_server(f"model={tiny_folder}", "port=0", "dtype=fp32", "device=cpu") as (process, url):
        assert httpx.get(f"{url}/health", timeout=30).json()["model"] == tiny_folder
        requests = mixed_requests(smollm2_tokenizer)[:2]

        async def score():
            teacher = RemoteTeacher(url)
            try:
                return await teacher.score(requests)
            finally:
                await teacher.close()

        got = anyio.run(score)
        expected = LocalTeacher(tiny_model).score_sync(requests)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.logprobs, e.logprobs, atol=1e-5, rtol=0)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "Teacher server stopped." in process.stdout.read()
    with pytest.raises(ProcessLookupError):  # nothing left in its process group
        os.killpg(process.pid, 0)


def test_the_cli_says_what_is_wrong_with_a_key():
    run = subprocess.run(
        [sys.executable, "-m", "recipes.serve_teacher", "port=-3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "port='-3': Input should be greater than or equal to 0" in run.stderr


# ---- the recipes -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_teacher_protocol_apprentice_builds_a_remote_teacher(url, tiny_folder):
    config = on_policy.Config(
        model_name=tiny_folder,
        teacher_model=tiny_folder,
        teacher_url=url,
        teacher_protocol="apprentice",
        lmbda=0.5,
        off_policy_source="teacher",
    )
    student = load_student(config)
    loaded = load_teacher(single_teacher(config), student, config=config)
    assert isinstance(loaded.teacher, RemoteTeacher)
    assert loaded.teacher.base_url == url and loaded.teacher.name == tiny_folder
    assert not loaded.full_vocabulary and loaded.model is None
    try:
        scores = await loaded.teacher.score([ScoreRequest([1, 2, 3], top_k=2)])
        assert scores[0].topk_ids.shape == (3, 2)
    finally:
        await loaded.teacher.close()
    with pytest.raises(ConfigError, match="teacher_protocol=apprentice\\) only scores"):
        make_teacher_policy(loaded, config)


def test_the_default_protocol_stays_vllm_and_keys_are_checked(tiny_folder):
    assert on_policy.Config(teacher_url="http://h:1").teacher_protocol is TeacherProtocol.VLLM
    with pytest.raises(ValueError, match="teacher_protocol=apprentice names a teacher server"):
        on_policy.Config(teacher_protocol="apprentice")
    with pytest.raises(ValueError, match="teacher_served_name names a vLLM server's model"):
        on_policy.Config(
            teacher_url="http://h:1", teacher_protocol="apprentice", teacher_served_name="x"
        )
    multi = MultiTeacherConfig(
        teachers=[{"model": tiny_folder, "url": "http://h:1", "protocol": "apprentice"}]
    )
    assert multi.teachers[0].protocol is TeacherProtocol.APPRENTICE


# ---- the embedded model ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
async def test_embedded_teacher_over_http_equals_local(smollm2, smollm2_tokenizer):
    tokens = smollm2_tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "List the files."},
            {"role": "assistant", "content": "Run `ls -la` to see them, hidden ones included."},
        ],
        tokenize=True,
        return_dict=False,
    )
    answer = [t >= len(tokens) - 12 for t in range(len(tokens))]  # the assistant's turn
    requests = [ScoreRequest(tokens, top_k=5), ScoreRequest(tokens, positions=answer, top_k=1)]
    local = LocalTeacher(smollm2, name="smollm2")
    expected = local.score_sync(requests)
    with serve_in_thread(local) as base_url:
        teacher = RemoteTeacher(base_url)
        try:
            got = await teacher.score(requests)
        finally:
            await teacher.close()
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)
    assert got[0].logprobs[1:].mean() > -6  # the real model: most tokens are likely
