"""The vLLM HTTP client's retries, against a simulated flaky server (``httpx.MockTransport``):
connection errors, 503 and 429 are retried with growing waits until the server answers;
running out of attempts, or a 4xx, is an error that names the URL. Also the server sampler's
request seeds and its LoRA adapter bookkeeping."""

from __future__ import annotations

import time

import httpx
import pytest

from training.errors import TeacherServerError
from training.vllm_http import CompletionsClient

pytestmark = pytest.mark.anyio

URL = "http://vllm.test:8000"
ANSWER = {"choices": [{"text": "ok"}]}


class FlakyServer:
    """Answers each request with the next scripted reply (then 200 with ``ANSWER``), recording
    when each request arrived."""

    def __init__(self, *replies: int | type[httpx.TransportError]) -> None:
        self.replies = list(replies)
        self.arrivals: list[float] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.arrivals.append(time.monotonic())
        self.paths.append(request.url.path)
        reply = self.replies.pop(0) if self.replies else 200
        if isinstance(reply, type):
            raise reply("simulated", request=request)
        if reply == 200:
            return httpx.Response(200, json=ANSWER)
        return httpx.Response(reply, text=f"simulated {reply}")


def client(server: FlakyServer, **options) -> CompletionsClient:
    return CompletionsClient(
        URL,
        what="vLLM teacher",
        error_type=TeacherServerError,
        transport=httpx.MockTransport(server),
        **options,
    )


async def test_transient_failures_are_retried_with_backoff_until_the_server_answers():
    server = FlakyServer(httpx.ConnectError, 503, 429)
    backoff = 0.05
    http = client(server, max_attempts=5, backoff_s=backoff)
    assert await http.post("/v1/completions", {"prompt": [1]}) == ANSWER
    await http.aclose()
    assert server.paths == ["/v1/completions"] * 4
    # waits of backoff * 2**(attempt - 1), jittered down to no less than half of that
    gaps = [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]
    for attempt, gap in enumerate(gaps, start=1):
        assert gap >= 0.5 * backoff * 2 ** (attempt - 1), gaps


async def test_running_out_of_attempts_names_the_url_and_the_last_failure():
    server = FlakyServer(*[503] * 10)
    http = client(server, max_attempts=3, backoff_s=0.001)
    with pytest.raises(TeacherServerError) as error:
        await http.post("/v1/completions", {"prompt": [1]})
    await http.aclose()
    assert len(server.arrivals) == 3
    message = str(error.value)
    assert f"vLLM teacher at {URL} failed after 3 attempts (HTTP 503: simulated 503)" in message
    assert "scripts/vllm_cpu.py serve" in message


async def test_a_client_error_is_not_retried():
    server = FlakyServer(400)
    http = client(server, max_attempts=5, backoff_s=0.001)
    with pytest.raises(TeacherServerError, match=f"vLLM teacher at {URL} rejected POST"):
        await http.post("/v1/completions", {"prompt": [1]})
    await http.aclose()
    assert len(server.arrivals) == 1


async def test_the_server_sampler_gives_each_request_its_own_seed():
    """One seed on every request would make vLLM draw the same completion for a group's
    identical prompts; request n carries seed + n, restarted by ``reseed``."""
    import json

    from training.samplers.vllm import VLLMServerSampler
    from training.types import SamplingParams

    seeds: list[int | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        seeds.append(json.loads(request.content).get("seed"))
        choice = {"token_ids": [7], "logprobs": {"token_logprobs": [-0.5]}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice]})

    sampler = VLLMServerSampler(URL, "m", seed=10)
    sampler.client = client(server)
    params = SamplingParams(max_tokens=4)
    for _ in range(3):
        assert (await sampler.sample([1, 2], params)).tokens == [7]
    sampler.reseed(40)
    await sampler.sample([1, 2], params)
    unseeded = VLLMServerSampler(URL, "m")
    unseeded.client = client(server)
    await unseeded.sample([1, 2], params)
    assert seeds == [10, 11, 12, 40, None]


async def test_the_server_sampler_keeps_one_adapter_loaded_and_unloads_it_at_close(
    make_tiny_model, caplog
):
    """Each update loads a new adapter and unloads (and deletes) the one before; the names carry
    a per-sampler id (two runs sharing a server never collide); ``close`` unloads the last one
    and removes the temporary folder. A server gone by then is logged, not raised."""
    import json

    from training import models
    from training.errors import SamplerServerError
    from training.samplers.vllm import VLLMServerSampler

    calls: list[tuple[str, str]] = []

    def server(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, json.loads(request.content)["lora_name"]))
        return httpx.Response(200, text="Success")

    student = models.add_lora(make_tiny_model(), models.LoraSettings(rank=4))
    samplers = [VLLMServerSampler(URL, "m"), VLLMServerSampler(URL, "m")]
    for sampler in samplers:
        sampler.client = client(server)
        await sampler.update_weights(student)
    first = samplers[0]
    await first.update_weights(student)
    names = [name for _, name in calls]
    assert names[0] != names[1] and names[0].startswith("m-lora-") and names[0].endswith("-v1")
    assert calls[2:] == [
        ("/v1/load_lora_adapter", first.model_name),
        ("/v1/unload_lora_adapter", names[0]),
    ]
    folder = first.adapter_dir
    assert folder is not None and not (folder / "v1").exists() and (folder / "v2").is_dir()
    await first.close()
    assert calls[-1] == ("/v1/unload_lora_adapter", names[2]) and first.model_name == "m"
    assert not folder.exists()

    gone = samplers[1]
    gone.client = CompletionsClient(
        URL,
        what="vLLM sampler",
        error_type=SamplerServerError,
        transport=httpx.MockTransport(FlakyServer(*[httpx.ConnectError] * 2)),
        max_attempts=2,
        backoff_s=0.01,
    )
    with caplog.at_level("WARNING"):
        await gone.close()
    assert "could not unload the sampler's LoRA adapter" in caplog.text
    assert f"vLLM sampler at {URL} is unreachable" in caplog.text
    assert gone.adapter_dir is not None and not gone.adapter_dir.exists()
