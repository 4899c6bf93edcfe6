"""Session-wide fixtures for the expensive real things. Package-specific fixtures live in
tests/<package>/conftest.py.

- ``embedded_model_dir`` / ``smollm2`` / ``smollm2_tokenizer``: the real embedded
  SmolLM2-135M-Instruct (converted once into the user cache, then reused; loaded once per
  session in fp32 so numerical comparisons are tight).
- ``tiny_model`` / ``make_tiny_model``: a randomly initialised 2-layer Llama sharing SmolLM2's
  tokenizer (``training.models.tiny_random_llama``, what ``model_name=tiny-random`` loads), for
  fast unit tests of samplers and teachers (~13 MB, builds in milliseconds).
- ``vllm_server``: a real vLLM server on this CPU serving the embedded model with LoRA enabled,
  started once for every test of the session that asks for it (tests/training, tests/recipes).

Tests marked ``bwrap`` or ``docker`` skip with the reason when that backend is missing here, and
fail when ``CI=true`` (``sandboxes.testing``), before any of their fixtures is built.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import httpx
import pytest
import torch

from sandboxes.testing import require_bwrap, require_docker
from training import models

REPO = Path(__file__).resolve().parents[1]
BACKEND_MARKERS = {"bwrap": require_bwrap, "docker": require_docker}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, require in BACKEND_MARKERS.items():
        if item.get_closest_marker(marker) is not None:
            require()


@pytest.fixture(scope="session")
def embedded_model_dir():
    return models.embedded_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(embedded_model_dir):
    return models.load_tokenizer(embedded_model_dir)


@pytest.fixture(scope="session")
def smollm2(embedded_model_dir):
    """The embedded model in fp32 on CPU, frozen. Treat as read-only."""
    model, _ = models.load_frozen(embedded_model_dir, dtype=torch.float32, device="cpu")
    return model


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer):
    """Shared across tests: treat as read-only (build your own with ``make_tiny_model``)."""
    return models.tiny_random_llama(len(smollm2_tokenizer))


@pytest.fixture(scope="session")
def make_tiny_model(smollm2_tokenizer):
    """A factory for fresh tiny models (``seed`` picks the random weights)."""
    return lambda seed=0: models.tiny_random_llama(len(smollm2_tokenizer), seed=seed)


def load_vllm_cpu_script():
    """``scripts/vllm_cpu.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vllm_cpu", REPO / "scripts" / "vllm_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVED_NAME = "smollm2-135m-instruct"
"""The name ``vllm_server`` serves the embedded model under (its ``models.EMBEDDED_MODEL``)."""
VLLM_MAX_LORA_RANK = 8
"""``vllm_server``'s ``--max-lora-rank``: adapters sent to it have at most this rank."""


def served_models(url: str) -> set[str]:
    """The model names a vLLM server answers to now: its base models and loaded adapters."""
    answer = httpx.get(f"{url}/v1/models", timeout=30)
    answer.raise_for_status()
    return {model["id"] for model in answer.json()["data"]}


@pytest.fixture(scope="session")
def vllm_server(embedded_model_dir, tmp_path_factory):
    """A real vLLM server on this CPU serving the embedded model (bf16), with runtime LoRA
    loading enabled. Builds ``.venv-vllm`` first if it is missing (~2 min), starts in ~2 min,
    and is always stopped (its whole process group) at the end of the session. It never skips:
    a machine that cannot build or start it fails the tests that need it."""
    script = load_vllm_cpu_script()
    script.install()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    process, url = script.start(
        embedded_model_dir,
        free_port(),
        served_model_name=SERVED_NAME,
        max_model_len=2048,
        enable_lora=True,
        max_lora_rank=VLLM_MAX_LORA_RANK,
        log_path=log,
    )
    try:
        yield url
    finally:
        script.stop(process)
