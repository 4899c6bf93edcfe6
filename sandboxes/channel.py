"""The host side of the spawner protocol (see ``sandboxes.shell``).

For each command the host creates ``<control dir>/<id>/`` with a ``req`` file (the command,
cwd and per-call env as shell assignments) and three FIFOs (``out``, ``err``, ``done``), opens
them, then writes ``<id>`` to the spawner. The spawner forks a job that writes the command's
output into the FIFOs and finally its exit status into ``done``. The host reads all three at
once, with the output capped, and stops at ``done`` — not at end-of-file, so a background job
that keeps stdout open cannot hang the call.

The FIFOs are opened read-write: opening never blocks and never reports a spurious
end-of-file before the job has opened its end. The control directory is owned by the host;
everything in it is opened without following symlinks, so a sandbox cannot trick the host into
reading or writing its own files.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import stat
import time
from collections.abc import Mapping
from pathlib import Path

import anyio

from sandboxes.errors import SandboxDeadError
from sandboxes.output import CappedOutput
from sandboxes.procs import kill_command, pid_namespace
from sandboxes.shell import request_script
from sandboxes.types import ExecResult

_CHUNK = 1 << 16


class SpawnerChannel:
    """Runs commands through one sandbox's spawner (its pid 1, ``init_pid`` on the host), which
    reads request ids from the pipe or FIFO whose write end is ``request_fd`` (non-blocking;
    the channel owns it and closes it, which ends the spawner)."""

    def __init__(
        self,
        *,
        sandbox_name: str,
        control_dir: Path,
        request_fd: int,
        init_pid: int,
        workdir: str,
        owner: tuple[int, int] | None = None,
    ) -> None:
        self.sandbox_name = sandbox_name
        self.control_dir = control_dir
        self.init_pid = init_pid
        self.workdir = workdir
        self._request_fd = request_fd
        os.set_blocking(request_fd, False)
        self._owner = owner
        self._pidfd = os.pidfd_open(init_pid)
        namespace = pid_namespace(init_pid)
        if namespace is None:
            raise SandboxDeadError(f"sandbox {sandbox_name!r}: its pid 1 ({init_pid}) is gone")
        self.namespace = namespace
        self._closed = False

    @property
    def alive(self) -> bool:
        """False once closed or once pid 1 exited (a pidfd turns readable when it does)."""
        return not self._closed and not select.select([self._pidfd], [], [], 0)[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._pidfd)
            os.close(self._request_fd)

    async def _send(self, line: bytes) -> None:
        # one line is far below PIPE_BUF: concurrent writes never interleave
        while True:
            try:
                os.write(self._request_fd, line)
                return
            except BlockingIOError:
                await anyio.wait_writable(self._request_fd)

    async def run(
        self,
        command: str,
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
        max_output_bytes: int,
        files: Mapping[str, bytes] | None = None,
        collect: str | None = None,
        persist: bool = True,
    ) -> tuple[ExecResult, bytes | None]:
        """Run ``command``; returns its result and, with ``collect``, the bytes the command
        wrote to ``$CONTROL_DIR/$APPRENTICE_EXEC/<collect>``. ``files`` are placed in that
        directory before the command starts."""
        if not self.alive:
            raise SandboxDeadError(
                f"sandbox {self.sandbox_name!r} is closed or dead; cannot run {command[:80]!r}"
            )
        exec_id = secrets.token_hex(8)
        directory = self.control_dir / exec_id
        started = time.monotonic()
        fds: dict[str, int] = {}
        dirfd = -1
        finished = False
        try:
            os.mkdir(directory)
            os.chmod(directory, 0o755)  # whatever the umask: the sandbox's uid reads it
            dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            self._write(
                dirfd, "req", request_script(command, cwd, env, self.workdir, persist).encode()
            )
            for name, data in (files or {}).items():
                self._write(dirfd, name, data)
            if collect:
                self._write(dirfd, collect, b"", mode=0o600, chown=True)
            for name in ("out", "err", "done"):
                os.mkfifo(name, 0o600, dir_fd=dirfd)
                if self._owner:
                    os.chown(name, *self._owner, dir_fd=dirfd, follow_symlinks=False)
                fds[name] = os.open(
                    name, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
                )
            await self._send(f"{exec_id}\n".encode())
            stdout, stderr = CappedOutput(max_output_bytes), CappedOutput(max_output_bytes)
            outcome = await self._wait(fds, stdout, stderr, timeout)
            if outcome == "timeout":
                await self._kill(exec_id)
            finished = True
            _drain(fds["out"], stdout)
            _drain(fds["err"], stderr)
            if outcome == "dead":
                raise SandboxDeadError(
                    f"sandbox {self.sandbox_name!r} died while running {command[:80]!r} "
                    "(killed from outside, out of memory, or closed)"
                )
            data = self._read_collected(dirfd, collect) if collect else None
            exit_code = outcome if isinstance(outcome, int) else None
            result = ExecResult(
                stdout=stdout.text(),
                stderr=stderr.text(),
                exit_code=exit_code,
                timed_out=outcome == "timeout",
                duration_s=time.monotonic() - started,
                truncated=stdout.truncated or stderr.truncated,
            )
            return result, data
        finally:
            with anyio.CancelScope(shield=True):
                if not finished and fds:
                    await self._kill(exec_id)
                for fd in fds.values():
                    os.close(fd)
                if dirfd >= 0:
                    os.close(dirfd)
                shutil.rmtree(directory, ignore_errors=True)
                if not finished and fds:
                    # a job that started between the kill and the removal: kill it too
                    await self._kill(exec_id)

    async def _wait(
        self, fds: dict[str, int], stdout: CappedOutput, stderr: CappedOutput, timeout: float | None
    ) -> int | str:
        """The exit status, or "timeout", or "dead"."""
        outcome: list[int | str] = []
        pidfd = os.dup(self._pidfd)
        try:
            with anyio.move_on_after(timeout):
                async with anyio.create_task_group() as group:

                    async def pump(fd: int, sink: CappedOutput) -> None:
                        while True:
                            await anyio.wait_readable(fd)
                            with contextlib.suppress(BlockingIOError):
                                sink.feed(os.read(fd, _CHUNK))

                    async def done() -> None:
                        status = b""
                        while not status.endswith(b"\n"):
                            await anyio.wait_readable(fds["done"])
                            with contextlib.suppress(BlockingIOError):
                                status += os.read(fds["done"], 64)
                        outcome.append(int(status))
                        group.cancel_scope.cancel()

                    async def dead() -> None:
                        await anyio.wait_readable(pidfd)
                        outcome.append("dead")
                        group.cancel_scope.cancel()

                    group.start_soon(pump, fds["out"], stdout)
                    group.start_soon(pump, fds["err"], stderr)
                    group.start_soon(done)
                    group.start_soon(dead)
        finally:
            os.close(pidfd)
        return outcome[0] if outcome else "timeout"

    async def _kill(self, exec_id: str) -> None:
        await anyio.to_thread.run_sync(kill_command, self.namespace, exec_id, self.init_pid)

    def _write(
        self, dirfd: int, name: str, data: bytes, mode: int = 0o644, chown: bool = False
    ) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dirfd)
        try:
            os.fchmod(fd, mode)
            if chown and self._owner:
                os.fchown(fd, *self._owner)
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
        finally:
            os.close(fd)

    def _read_collected(self, dirfd: int, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SandboxDeadError(
                    f"sandbox {self.sandbox_name!r}: {name} in the control directory was "
                    "replaced by something other than a regular file"
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read()
        finally:
            os.close(fd)


def _drain(fd: int, sink: CappedOutput) -> None:
    while True:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        if not data:
            return
        sink.feed(data)
