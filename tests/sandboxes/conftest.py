"""Fixtures for sandbox tests: the real backends, created per test, checked for leaks.

Docker tests are marked ``docker`` and bubblewrap tests ``bwrap``; when the backend is missing
they skip with the reason, or fail when ``CI=true`` (see ``sandboxes.testing``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxes.local import LocalFactory
from sandboxes.testing import require_bwrap, require_docker
from sandboxes.types import Sandbox, SandboxSpec

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/sandboxes run on asyncio through anyio's pytest plugin."""
    return "asyncio"


@pytest.fixture
def bwrap() -> None:
    require_bwrap()


@pytest.fixture
def docker() -> None:
    require_docker()


@pytest.fixture
def local_factory(bwrap: None) -> LocalFactory:
    return LocalFactory()


@pytest.fixture
def docker_factory(docker: None):
    from sandboxes.docker import DockerFactory

    return DockerFactory()


@pytest.fixture
def docker_api_factory(docker: None):
    """Docker through exec_create/exec_start (what a remote daemon gets)."""
    from sandboxes.docker import DockerFactory

    return DockerFactory(exec_mode="api")


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.bwrap),
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("docker_api", marks=pytest.mark.docker),
    ]
)
def factory(request: pytest.FixtureRequest):
    """Each backend in turn (tests using it run once per backend)."""
    return request.getfixturevalue(f"{request.param}_factory")


@pytest.fixture
async def sandbox(factory) -> AsyncIterator[Sandbox]:
    sandbox = await factory.create(SandboxSpec(name="test-sandbox", memory_mb=512))
    try:
        yield sandbox
    finally:
        await sandbox.close()
