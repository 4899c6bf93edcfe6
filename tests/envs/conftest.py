"""Fixtures for envs tests: small Harbor task directories written on the fly, and the real
sandbox factories (bubblewrap and docker) for grading and episodes."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

TASK_TOML = """\
schema_version = "1.4"

[verifier]
timeout_sec = 20.0

[agent]
timeout_sec = 60.0

[environment]
cpus = 1
memory_mb = 512
network_mode = "no-network"
"""

WRITE_ONE = "#!/bin/bash\necho 1 > /logs/verifier/reward.txt\n"


def write_task(
    root: Path,
    name: str = "demo",
    *,
    instruction: str | None = "Do the thing.\n",
    task_toml: str | None = TASK_TOML,
    test_sh: str | None = WRITE_ONE,
    solve_sh: str | None = "#!/bin/bash\necho solved > /app/out.txt\n",
    dockerfile: str | None = "FROM debian:bookworm-slim\nWORKDIR /app\n",
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """A task directory under ``root``; pass None to leave a part out. ``files`` are extra
    files relative to the task directory (bytes are written verbatim)."""
    task = root / name
    task.mkdir(parents=True)
    parts = {
        "instruction.md": instruction,
        "task.toml": task_toml,
        "tests/test.sh": test_sh,
        "solution/solve.sh": solve_sh,
        "environment/Dockerfile": dockerfile,
        **(files or {}),
    }
    for rel, content in parts.items():
        if content is None:
            continue
        path = task / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if rel.endswith(".sh"):
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return task


@pytest.fixture
def make_task(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "demo", **kwargs) -> Path:
        return write_task(tmp_path / "tasks", name, **kwargs)

    return make


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/envs run on asyncio through anyio's pytest plugin."""
    return "asyncio"
