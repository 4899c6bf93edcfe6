"""The concepts of ``sandboxes``, in one place.

    SandboxSpec   what to build: a Harbor task's environment folder + its [environment] settings
    SandboxFactory  SandboxSpec -> Sandbox (one per backend: local bubblewrap, docker, harbor)
    Sandbox       an isolated machine you can exec in and copy files to/from; async; closeable
    ExecResult    stdout, stderr, exit code, timed_out, duration of one command

``sandboxes`` knows nothing about models, tools or training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self, runtime_checkable


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command. ``exit_code`` is None only when the command was killed."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    duration_s: float = 0.0
    truncated: bool = False
    """Output exceeded the sandbox's cap and was cut (with a visible marker)."""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to create a sandbox for one task."""

    name: str
    """A human-readable name (the task name): appears in errors, container names and logs."""
    environment_dir: Path | None = None
    """The task's ``environment/`` folder (Dockerfile and build context)."""
    docker_image: str | None = None
    """A prebuilt image; wins over ``environment_dir``'s Dockerfile."""
    workdir: str = "/app"
    cpus: float | None = None
    memory_mb: int | None = None
    storage_mb: int | None = None
    pids_limit: int | None = 512
    cpu_time_s: float | None = None
    """CPU seconds per process (RLIMIT_CPU): stops a runaway computation even without a
    timeout. None: no limit."""
    network: bool = False
    """Outbound network; False means loopback only."""
    env: dict[str, str] = field(default_factory=dict)
    build_timeout_s: float = 600.0
    default_timeout_s: float | None = None
    """Timeout for ``exec`` calls that pass none."""
    max_output_bytes: int = 1 << 20
    """Cap on captured stdout/stderr per command."""


@runtime_checkable
class Sandbox(Protocol):
    """An isolated place to run commands. Use ``async with`` so it is always closed."""

    spec: SandboxSpec

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``command`` with bash. A timeout kills the command's whole process tree.
        The working directory and exported variables persist from one call to the next (like a
        terminal); ``cwd`` and ``env`` given here apply to this call only (docs/sandboxes.md).
        Raises ``SandboxError`` only when the sandbox itself is broken, never for a failing
        command."""
        ...

    async def upload_file(self, local: Path, remote: str) -> None: ...

    async def upload_dir(self, local: Path, remote: str) -> None: ...

    async def download_file(self, remote: str, local: Path) -> None: ...

    async def download_dir(self, remote: str, local: Path) -> None: ...

    async def close(self) -> None:
        """Destroy the sandbox and everything it started. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


@runtime_checkable
class SandboxFactory(Protocol):
    """Creates sandboxes of one backend. ``await factory.create(spec)``."""

    async def create(self, spec: SandboxSpec) -> Sandbox: ...
