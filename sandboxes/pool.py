"""Bounded concurrency for sandbox creation.

Creating a sandbox is the expensive, bursty part (a build, a container start, a bubblewrap
start plus the Dockerfile's steps): a batch of 64 episodes starting at once on a 2-core machine
would otherwise time out or overwhelm the docker daemon. Commands are cheap and are not
limited. ``make_factory`` wraps every backend in a ``BoundedFactory``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import anyio
from anyio.lowlevel import RunVar

from sandboxes.types import Sandbox, SandboxFactory, SandboxSpec


def default_create_limit() -> int:
    """Sandboxes created at once: 4 per CPU core (creation mostly waits on I/O), at most 32."""
    return min(32, 4 * (os.cpu_count() or 1))


@dataclass
class BoundedFactory:
    """Any factory, with at most ``limit`` ``create`` calls in flight at a time."""

    inner: SandboxFactory
    limit: int = 0

    def __post_init__(self) -> None:
        if self.limit <= 0:
            self.limit = default_create_limit()
        # one limiter per event loop run, so a factory survives several anyio.run calls
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"sandbox-create-{id(self)}")

    async def create(self, spec: SandboxSpec) -> Sandbox:
        try:
            limiter = self._limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(self.limit)
            self._limiter.set(limiter)
        async with limiter:
            return await self.inner.create(spec)

    def __getattr__(self, name: str):
        # expose the backend's own attributes (e.g. DockerFactory.run_id)
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
