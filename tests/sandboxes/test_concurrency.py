"""64 live sandboxes at once on a 2-core machine, with zero failures, through the bounded
factory that ``make_factory`` returns."""

from __future__ import annotations

import anyio
import pytest

from sandboxes.factory import make_factory
from sandboxes.pool import BoundedFactory
from sandboxes.types import Sandbox, SandboxSpec

pytestmark = pytest.mark.anyio

N = 64


async def run_many(factory, n: int = N) -> list[str]:
    """Creates n sandboxes concurrently, keeps them all alive at once, runs a command in each,
    closes them; returns the failures (empty means all worked)."""
    failures: list[str] = []
    created = anyio.Event()
    live = 0

    async def one(i: int) -> None:
        nonlocal live
        try:
            async with await factory.create(SandboxSpec(name=f"many-{i}", memory_mb=256)) as box:
                live += 1
                if live == n:
                    created.set()
                with anyio.fail_after(300):
                    await created.wait()
                result = await box.exec(f"echo $((6 * {i}))", timeout=60)
                if result.stdout != f"{6 * i}\n":
                    failures.append(f"{i}: {result}")
        except Exception as exc:
            failures.append(f"{i}: {type(exc).__name__}: {exc}")
            created.set()

    async with anyio.create_task_group() as group:
        for i in range(n):
            group.start_soon(one, i)
    return failures


@pytest.mark.bwrap
async def test_64_local_sandboxes_at_once(bwrap: None) -> None:
    assert await run_many(make_factory("local")) == []


@pytest.mark.docker
async def test_64_docker_sandboxes_at_once(docker: None) -> None:
    assert await run_many(make_factory("docker")) == []


class ProbeFactory:
    """Counts how many creations overlap (a stand-in backend for the limiter alone)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    async def create(self, spec: SandboxSpec) -> Sandbox:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await anyio.sleep(0.01)
        self.in_flight -= 1
        return spec  # type: ignore[return-value]


async def test_bounded_factory_limits_concurrent_creation() -> None:
    probe = ProbeFactory()
    factory = BoundedFactory(probe, limit=3)
    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(factory.create, SandboxSpec(name=str(i)))
    assert probe.peak == 3


def test_bounded_factory_survives_several_event_loops() -> None:
    factory = BoundedFactory(ProbeFactory(), limit=2)
    for _ in range(2):
        anyio.run(factory.create, SandboxSpec(name="x"))


@pytest.mark.parametrize(
    ("version", "serialised"),
    [
        ("20.10.24+dfsg1", True),
        ("20.10.5", True),
        ("23.0.0", False),
        ("28.2.2", False),
        ("", False),
    ],
)
def test_daemons_with_the_endpoint_deadlock_start_and_remove_one_at_a_time(version, serialised):
    from sandboxes.docker import needs_endpoint_lock

    assert needs_endpoint_lock(version) is serialised
