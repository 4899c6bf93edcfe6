"""Errors of ``sandboxes``.

A failing *command* is never an error: it is an ``ExecResult`` with a non-zero exit code (or
``timed_out``). These exceptions mean the *sandbox* could not be built, started or reached.
Each message names the task, image, path or backend involved and says what was expected.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of this package's errors."""


class SandboxBuildError(SandboxError):
    """Building the task's image (docker) or realising its Dockerfile (local) failed."""


class SandboxStartError(SandboxError):
    """The sandbox could not be started (bubblewrap or the container failed to come up)."""


class SandboxDeadError(SandboxError):
    """The sandbox is closed, or died under a running command (killed, OOM, daemon gone)."""


class UnsupportedDockerfileError(SandboxBuildError):
    """The local backend cannot honour this Dockerfile; the docker backend can."""

    def __init__(self, dockerfile: object, line: int | None, reason: str) -> None:
        where = f"{dockerfile}:{line}" if line else f"{dockerfile}"
        super().__init__(
            f"{where}: {reason}. The local (bubblewrap) backend runs on the host's read-only "
            "root and only honours FROM (ignored), WORKDIR, ENV, ARG, COPY/ADD of local files "
            "into writable directories, and RUN steps that need nothing the host lacks. "
            "Use the docker backend for this task (backend=docker)."
        )
        self.dockerfile = dockerfile
        self.line = line
        self.reason = reason


class DockerUnavailableError(SandboxError):
    """No docker daemon answered, or the docker SDK is missing."""


class BubblewrapUnavailableError(SandboxError):
    """``bwrap`` is not installed or cannot create namespaces on this host."""


class SandboxFileError(SandboxError):
    """Copying files in or out failed: a missing path, or a destination that is read-only."""
