"""Fixtures for sandbox tests: the real backends, created per test, checked for leaks.

Docker tests are marked ``docker`` and bubblewrap tests ``bwrap``; when the backend is missing
they skip with the reason, or fail when ``CI=true`` (see ``sandboxes.testing``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandboxes.docker import docker_available, owner_id
from sandboxes.local import OWNER_FILE, LocalFactory, control_root, default_root
from sandboxes.testing import require_bwrap, require_docker
from sandboxes.types import Sandbox, SandboxSpec

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_sandboxes() -> Iterator[None]:
    """After the whole suite: no container and no sandbox folder of this process remains."""
    yield
    leaks: list[str] = []
    homes = [
        h for root in (default_root(), control_root()) if root.is_dir() for h in root.iterdir()
    ]
    for home in homes:
        try:
            owner = json.loads((home / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner.get("pid") == os.getpid():
            leaks.append(f"sandbox folder {home}")
            shutil.rmtree(home, ignore_errors=True)
    if docker_available() is None:
        import docker

        api = docker.from_env().api
        mine = f"{owner_id().rsplit(':', 1)[0]}:"
        for container in api.containers(all=True, filters={"label": "apprentice.sandbox=1"}):
            if container["Labels"].get("apprentice.owner", "").startswith(mine):
                leaks.append(f"container {container['Names']} ({container['Status']})")
                api.remove_container(container["Id"], force=True)
    if leaks:
        pytest.fail("sandboxes leaked by the test suite: " + "; ".join(leaks), pytrace=False)


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
