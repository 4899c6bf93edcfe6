"""The local backend: one bubblewrap sandbox per task, no daemon, ready in milliseconds.

Layout inside the sandbox:

    /usr /etc /opt /var ...   the host's, read-only (``/var/tmp``, ``/var/log`` masked)
    /app /tmp /logs /tests /solution /root, WORKDIR and COPY targets elsewhere
                              private and writable, backed by ``<root>/<id>/fs/`` on the host
    /run                      private tmpfs; /run/apprentice/ctl is the host's control dir
    /proc /dev                the sandbox's own
    no /home, /mnt, /srv, /work, ...  (host secrets stay out)

Isolation: all namespaces are new (pid, mount, net, ipc, uts, user; nested user namespaces are
refused). When the host runs us as root, bubblewrap itself runs as a fresh unprivileged uid
chosen for this sandbox, mapped to root inside: the sandbox's "root" owns nothing on the host,
so even a read-only bypass could not touch host files, and ``RLIMIT_NPROC`` counts only this
sandbox's processes. No network unless ``spec.network`` (then the host's is shared).

Limits: a cgroup per sandbox when the host allows (``sandboxes.cgroups``: pids, memory, CPU for
the whole tree), plus rlimits on pid 1 that every process inherits (``RLIMIT_NPROC``, and
``RLIMIT_AS`` when there is no memory cgroup, ``RLIMIT_CPU`` for ``spec.cpu_time_s``).

Commands go through the spawner (``sandboxes.shell``/``sandboxes.channel``); files travel as
tar archives through the control directory and are unpacked inside by the sandbox's own root,
so a symlink planted in the sandbox can never redirect a host-side write.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Self

import anyio
from anyio.abc import Process

from sandboxes import cleanup, dockerfile
from sandboxes.cgroups import Cgroup, reap_stale
from sandboxes.channel import SpawnerChannel
from sandboxes.errors import (
    BubblewrapUnavailableError,
    SandboxBuildError,
    SandboxDeadError,
    SandboxError,
    SandboxFileError,
    SandboxStartError,
    UnsupportedDockerfileError,
)
from sandboxes.hostfs import host_tar_filter, make_dirs
from sandboxes.procs import kill_namespace, pid_exists, pid_namespace
from sandboxes.shell import CONTROL_DIR, spawner_argv
from sandboxes.types import ExecResult, SandboxSpec

logger = logging.getLogger(__name__)

HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt", "var")
"""Top-level host directories the sandbox sees (read-only). Everything else is absent."""
MASKED = ("/var/tmp", "/var/log", "/var/lib/docker", "/var/lib/containerd")
"""Host paths under HOST_DIRS replaced by empty private tmpfs."""
PRIVATE = ("/app", "/tmp", "/logs", "/tests", "/solution", "/root")
"""Writable directories every sandbox has (plus its WORKDIR and COPY targets)."""
DOCKER_DEFAULT_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""Capabilities inside the sandbox's own user namespace (docker's defaults); they grant
nothing on the host."""
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
OWNER_FILE = "owner.json"


def default_root() -> Path:
    return Path(
        os.environ.get("APPRENTICE_SANDBOX_ROOT")
        or Path(tempfile.gettempdir()) / "apprentice-sandboxes"
    )


def control_root() -> Path:
    """Where control directories go: a tmpfs (``/dev/shm``) when there is one. A command
    creates and removes a directory there; on this machine's disk that alone costs ~3 ms,
    on tmpfs ~0.02 ms."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) and _is_tmpfs(shm):
        return shm / "apprentice-ctl"
    return default_root() / ".ctl"


def _is_tmpfs(path: Path) -> bool:
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(path), "tmpfs"] for line in f)
    return False


def bwrap_available() -> str | None:
    """None when bubblewrap can create a sandbox here, else the reason it cannot."""
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap (bwrap) is not installed; apt-get install bubblewrap"
    probe = subprocess.run(
        [path, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.strip()}"
    return None


@dataclass
class LocalFactory:
    """Creates bubblewrap sandboxes under ``root`` (default ``$APPRENTICE_SANDBOX_ROOT`` or
    ``/tmp/apprentice-sandboxes``)."""

    root: Path = field(default_factory=default_root)
    _reaped: bool = False

    async def create(self, spec: SandboxSpec) -> LocalSandbox:
        if not self._reaped:
            self._reaped = True
            await anyio.to_thread.run_sync(reap_leftovers, self.root)
        return await LocalSandbox.create(spec, self.root)


@dataclass
class _Layout:
    """Where the sandbox's writable directories live on the host."""

    home: Path
    control: Path
    private: dict[str, Path] = field(default_factory=dict)

    def add(self, inside: str) -> Path:
        host = self.home / "fs" / (inside.strip("/").replace("/", "__") or "root")
        self.private[inside] = host
        return host

    def root_of(self, path: str) -> str | None:
        """The private directory that holds ``path``, if any."""
        p = PurePosixPath(path)
        for inside in self.private:
            if p == PurePosixPath(inside) or PurePosixPath(inside) in p.parents:
                return inside
        return None


class LocalSandbox:
    """A bubblewrap sandbox. Create with ``await LocalSandbox.create(spec)`` (or a factory)."""

    def __init__(self, spec: SandboxSpec, layout: _Layout, uid: int | None) -> None:
        self.spec = spec
        self._layout = layout
        self._uid = uid
        self._process: Process | None = None
        self._channel: SpawnerChannel | None = None
        self._cgroup: Cgroup | None = None
        self._init_pid: int | None = None
        self._request_fd = -1
        self._closed = False
        self.limits: list[str] = []
        """What is enforced, e.g. ``["pids.max=512", "memory=512MB", "RLIMIT_NPROC=514"]``."""

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    async def create(cls, spec: SandboxSpec, root: Path | None = None) -> Self:
        if shutil.which("bwrap") is None:
            raise BubblewrapUnavailableError(
                f"sandbox {spec.name!r}: bubblewrap (bwrap) is not installed; "
                "apt-get install bubblewrap, or use the docker backend"
            )
        steps = _plan(spec)
        root = root or default_root()
        make_dirs(root, exist_ok=True)
        uid = 1_000_000_000 + secrets.randbelow(1_000_000_000) if os.geteuid() == 0 else None
        if uid is not None:
            _check_reachable(root, spec.name)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name)[:40] or "sandbox"
        home = root / f"{slug}-{os.getpid()}-{secrets.token_hex(4)}"
        sandbox = cls(spec, _Layout(home, control_root() / home.name), uid)
        cleanup.register(sandbox, sandbox._kill_now)
        try:
            sandbox._prepare_dirs(steps)
            await sandbox._start()
            await sandbox._build(steps)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sandbox.close()
            raise
        return sandbox

    def _prepare_dirs(self, steps: list[dockerfile.Step]) -> None:
        layout, spec = self._layout, self.spec
        make_dirs(layout.home)
        self._write_owner()
        make_dirs(layout.control.parent, exist_ok=True)
        make_dirs(layout.control)
        for inside in PRIVATE:
            layout.add(inside)
        wanted: list[tuple[str, int | None]] = [(spec.workdir, None)]
        for step in steps:
            if isinstance(step, dockerfile.Workdir):
                wanted.append((step.path, step.line))
            elif isinstance(step, dockerfile.Copy):
                wanted.append((step.dest, step.line))
        for path, line in wanted:
            if layout.root_of(path) is not None:
                continue
            top = "/" + PurePosixPath(path).parts[1] if path != "/" else "/"
            if top == "/" or top.strip("/") in HOST_DIRS:
                where = f"{path!r} is on the host's read-only root"
                if line is None:
                    raise SandboxStartError(
                        f"sandbox {spec.name!r}: workdir {where}; choose a workdir such as "
                        "/app, or use the docker backend"
                    )
                raise UnsupportedDockerfileError(self._dockerfile, line, f"it writes to {where}")
            layout.add(top)
        for inside, host in layout.private.items():
            make_dirs(host, 0o1777 if inside == "/tmp" else 0o755)
            self._own(host)
        for sub in ("/logs/agent", "/logs/verifier", spec.workdir):
            inside = layout.root_of(sub)
            if inside is None:
                continue
            path = layout.private[inside]
            for part in PurePosixPath(sub).relative_to(inside).parts:
                path = path / part
                if not path.exists():
                    make_dirs(path)
                    self._own(path)

    def _write_owner(self) -> None:
        """What the reaper needs if this process dies without closing the sandbox."""
        owner = {
            "pid": os.getpid(),
            "init_pid": self._init_pid,
            "control": str(self._layout.control),
        }
        (self._layout.home / OWNER_FILE).write_text(json.dumps(owner))

    @property
    def _dockerfile(self) -> Path:
        return (self.spec.environment_dir or Path(".")) / "Dockerfile"

    def _own(self, path: Path) -> None:
        if self._uid is not None:
            os.chown(path, self._uid, self._uid)

    def _bwrap_argv(self, info_fd: int) -> list[str]:
        spec, layout = self.spec, self._layout
        argv = ["prlimit", *self._rlimits(), "--"] if self._rlimits() else []
        if self._uid is not None:
            argv += ["setpriv", f"--reuid={self._uid}", f"--regid={self._uid}", "--clear-groups"]
            argv += ["--"]
        argv += ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns"]
        if spec.network:
            argv.append("--share-net")
        argv += ["--as-pid-1", "--new-session", "--uid", "0", "--gid", "0"]
        argv += ["--hostname", re.sub(r"[^a-z0-9-]+", "-", spec.name.lower())[:63] or "sandbox"]
        for cap in DOCKER_DEFAULT_CAPS:
            argv += ["--cap-add", cap]
        for name in HOST_DIRS:
            host = Path("/") / name
            if host.is_symlink():
                argv += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                argv += ["--ro-bind", str(host), str(host)]
        for masked in MASKED:
            if Path(masked).is_dir() and not Path(masked).is_symlink():
                argv += ["--tmpfs", masked]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run"]
        argv += ["--bind", str(layout.control), CONTROL_DIR]
        for inside, host in layout.private.items():
            argv += ["--bind", str(host), inside]
        argv += ["--remount-ro", "/", "--chdir", "/", "--info-fd", str(info_fd), "--"]
        return argv + spawner_argv()

    async def _start(self) -> None:
        spec = self.spec
        self._create_cgroup()
        self.limits += ["RLIMIT_" + o.lstrip("-").upper() for o in self._rlimits()]
        info_read, info_write = os.pipe()
        # the spawner reads requests from this pipe; when we die, it reads end-of-file and exits
        requests_read, self._request_fd = os.pipe2(os.O_CLOEXEC)
        log_path = self._layout.home / "bwrap.log"
        try:
            with open(log_path, "wb") as log:
                self._process = await anyio.open_process(
                    self._bwrap_argv(info_write),
                    stdin=requests_read,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env={**BASE_ENV, **spec.env},
                    pass_fds=(info_write,),
                    start_new_session=True,
                )
        finally:
            os.close(info_write)
            os.close(requests_read)
        try:
            info = await _read_info(info_read, timeout=30)
        finally:
            os.close(info_read)
        if info is None:
            await self._process.wait()
            raise SandboxStartError(
                f"sandbox {spec.name!r}: bubblewrap exited before starting: "
                f"{log_path.read_text(errors='replace').strip() or 'no message'}"
            )
        self._init_pid = int(info["child-pid"])
        self._write_owner()
        try:
            self._enter_cgroup(self._init_pid)
        except ProcessLookupError:  # pid 1 failed right after bwrap reported it: say why
            with anyio.move_on_after(5):
                await self._process.wait()
            raise SandboxStartError(
                f"sandbox {spec.name!r}: bubblewrap's pid 1 exited right after starting: "
                f"{log_path.read_text(errors='replace').strip() or 'no message'}"
            ) from None
        self._channel = SpawnerChannel(
            sandbox_name=spec.name,
            control_dir=self._layout.control,
            request_fd=self._request_fd,
            init_pid=self._init_pid,
            workdir=spec.workdir,
            owner=(self._uid, self._uid) if self._uid is not None else None,
        )

    def _create_cgroup(self) -> None:
        spec = self.spec
        self._cgroup = Cgroup.create(
            self._layout.home.name, pids=spec.pids_limit, memory_mb=spec.memory_mb, cpus=spec.cpus
        )
        if self._cgroup is not None:
            self.limits += self._cgroup.limits

    def _rlimits(self) -> list[str]:
        """prlimit options, inherited by every process of the sandbox. ``RLIMIT_NPROC`` counts
        this sandbox's own uid only (bwrap's monitor and pid 1 included, hence +2)."""
        spec = self.spec
        options = []
        has_memory_cgroup = any(limit.startswith("memory") for limit in self.limits)
        if spec.pids_limit and self._uid is not None:
            options.append(f"--nproc={spec.pids_limit + 2}")
        if spec.memory_mb and not has_memory_cgroup:
            options.append(f"--as={spec.memory_mb * 1024 * 1024}")
        if spec.cpu_time_s:
            options.append(f"--cpu={int(spec.cpu_time_s)}")
        return options

    def _enter_cgroup(self, pid: int) -> None:
        """Before the spawner forks anything: its cgroup, and an OOM score that makes the
        commands, not pid 1, the OOM killer's choice."""
        if self._cgroup is not None:
            self._cgroup.add(pid)
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/oom_score_adj").write_text("-1000")

    async def _build(self, steps: list[dockerfile.Step]) -> None:
        """Replay the Dockerfile's steps; any failure refuses the whole sandbox."""
        spec = self.spec
        deadline = time.monotonic() + spec.build_timeout_s
        last_workdir: str | None = None
        for step in steps:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxBuildError(
                    f"sandbox {spec.name!r}: realising {self._dockerfile} took longer than "
                    f"build_timeout_s={spec.build_timeout_s}"
                )
            if isinstance(step, dockerfile.Workdir):
                await self._build_step(step, _enter(step.path))
                last_workdir = step.path
            elif isinstance(step, dockerfile.Env):
                exports = " ".join(shlex.quote(f"{k}={v}") for k, v in step.values.items())
                await self._build_step(step, f"export -- {exports}")
            elif isinstance(step, dockerfile.Copy):
                await self._copy(step)
            elif isinstance(step, dockerfile.Run):
                if await anyio.to_thread.run_sync(dockerfile.host_provides, step.command):
                    logger.info(
                        "%s:%s: the host already has these packages; skipped: RUN %s",
                        self._dockerfile,
                        step.line,
                        step.command,
                    )
                    continue
                await self._build_step(step, step.command, env=step.build_env, timeout=remaining)
        if last_workdir != spec.workdir and (steps or spec.workdir != "/app"):
            await self._build_step(None, _enter(spec.workdir))

    async def _build_step(
        self,
        step: dockerfile.Step | None,
        command: str,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        result = await self.exec(command, env=env, timeout=timeout or self.spec.build_timeout_s)
        if result.ok:
            return
        line = step.line if step is not None else None
        detail = (result.stderr.strip() or result.stdout.strip())[-800:] or "no output"
        if result.timed_out:
            raise SandboxBuildError(
                f"{self._dockerfile}:{line}: timed out after {result.duration_s:.0f}s: {command}"
            )
        if isinstance(step, dockerfile.Run):
            raise UnsupportedDockerfileError(
                self._dockerfile,
                line,
                f"RUN {command!r} failed with exit code {result.exit_code} on the host's "
                f"read-only root (missing package or write outside the workspace?): {detail}",
            )
        raise SandboxBuildError(
            f"sandbox {self.spec.name!r}: {self._dockerfile}:{line}: {command!r} failed "
            f"with exit code {result.exit_code}: {detail}"
        )

    async def _copy(self, step: dockerfile.Copy) -> None:
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for source in step.sources:
                if step.extract:
                    continue
                if source.is_dir():
                    for child in sorted(source.iterdir()):
                        tar.add(child, arcname=child.name, filter=_mode_filter(step.chmod))
                else:
                    tar.add(source, arcname=source.name, filter=_mode_filter(step.chmod))
        if step.extract:
            data = step.sources[0].read_bytes()
            command = _unpack(step.dest)
        elif step.dest_is_dir:
            data = archive.getvalue()
            command = _unpack(step.dest)
        else:
            data = archive.getvalue()
            dest = shlex.quote(step.dest)
            command = (
                f'if [ -d {dest} ]; then tar -x --no-same-owner -f "$in" -C {dest}; '
                f'else mkdir -p -- "$(dirname -- {dest})" && tar -x -O -f "$in" > {dest}'
                + (
                    f" && chmod {step.chmod:o} {dest}"
                    if step.chmod is not None
                    else f" && chmod {step.sources[0].stat().st_mode & 0o7777:o} {dest}"
                )
                + "; fi"
            )
        await self._run_with_files(
            f"in={CONTROL_DIR}/$APPRENTICE_EXEC/in.tar; {command}",
            {"in.tar": data},
            what=(
                f"{self._dockerfile}:{step.line}: COPY to {step.dest}"
                if step.line  # line 0: a prebuilt image's loose files, no Dockerfile
                else f"copying {step.sources[0]} into {step.dest}"
            ),
            error=SandboxBuildError,
        )

    # ---- the Sandbox protocol -------------------------------------------------------------

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        *,
        persist: bool = True,
    ) -> ExecResult:
        """See ``Sandbox.exec``. ``persist=False`` runs the command without restoring or
        saving the shell state (cwd/exports), like Harbor's stateless exec."""
        channel = self._require_channel()
        result, _ = await channel.run(
            command,
            cwd=cwd,
            env=env,
            timeout=timeout if timeout is not None else self.spec.default_timeout_s,
            max_output_bytes=self.spec.max_output_bytes,
            persist=persist,
        )
        return result

    async def upload_file(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"upload_file: {local} is not a file")
        await self._upload(local, remote)

    async def upload_dir(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_dir():
            raise FileNotFoundError(f"upload_dir: {local} is not a directory")
        await self._upload(local, remote)

    async def download_file(self, remote: str, local: Path) -> None:
        data = await self._collect(
            f'cat -- {shlex.quote(remote)} > "$out"', what=f"download_file {remote}"
        )
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)

    async def download_dir(self, remote: str, local: Path) -> None:
        data = await self._collect(
            f'tar -c -f "$out" -C {shlex.quote(remote)} .', what=f"download_dir {remote}"
        )
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(local, filter=host_tar_filter)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cleanup.unregister(self)
        with anyio.CancelScope(shield=True):
            if self._channel is not None:
                self._channel.close()  # closes the request pipe too
            elif self._request_fd >= 0:
                os.close(self._request_fd)
            self._request_fd = -1
            if self._init_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._init_pid, signal.SIGKILL)
            if self._process is not None:
                # os.kill, not Process.kill(): Popen.kill() polls and would reap the exit
                # status behind asyncio's child watcher
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._process.pid, signal.SIGKILL)
                await self._process.aclose()  # closes the transport, waits
            await anyio.to_thread.run_sync(self._remove)

    def _kill_now(self) -> None:
        """Synchronous close for process exit (see ``sandboxes.cleanup``)."""
        if self._init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._init_pid, signal.SIGKILL)
        self._remove()

    def _remove(self) -> None:
        if self._cgroup is not None:
            self._cgroup.remove()
        shutil.rmtree(self._layout.control, ignore_errors=True)
        shutil.rmtree(self._layout.home, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"LocalSandbox({self.spec.name!r}, home={str(self._layout.home)!r})"

    # ---- internals ------------------------------------------------------------------------

    def _require_channel(self) -> SpawnerChannel:
        if self._closed or self._channel is None:
            raise SandboxDeadError(f"sandbox {self.spec.name!r} is closed")
        return self._channel

    async def _upload(self, local: Path, remote: str) -> None:
        remote_path = PurePosixPath(remote)
        if not remote_path.is_absolute():
            remote_path = PurePosixPath(self.spec.workdir, remote)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(local, arcname=str(remote_path).lstrip("/") or ".")
        await self._run_with_files(
            f"tar -x --no-same-owner -f {CONTROL_DIR}/$APPRENTICE_EXEC/in.tar -C /",
            {"in.tar": archive.getvalue()},
            what=f"upload {local} to {remote}",
            error=SandboxFileError,
        )

    async def _run_with_files(
        self, command: str, files: dict[str, bytes], what: str, error: type[SandboxError]
    ) -> None:
        result, _ = await self._require_channel().run(
            command, cwd="/", env=None, timeout=None, max_output_bytes=64 * 1024, files=files
        )
        if not result.ok:
            raise error(
                f"sandbox {self.spec.name!r}: {what} failed: "
                f"{(result.stderr.strip() or result.stdout.strip())[-800:] or result.exit_code}"
            )

    async def _collect(self, command: str, what: str) -> bytes:
        result, data = await self._require_channel().run(
            f"out={CONTROL_DIR}/$APPRENTICE_EXEC/data; {command}",
            cwd="/",
            env=None,
            timeout=None,
            max_output_bytes=64 * 1024,
            collect="data",
        )
        if not result.ok or data is None:
            raise SandboxFileError(
                f"sandbox {self.spec.name!r}: {what} failed: "
                f"{result.stderr.strip()[-800:] or result.exit_code}"
            )
        return data


def _check_reachable(root: Path, name: str) -> None:
    """bubblewrap runs as the sandbox's own unprivileged uid: it must be able to walk to
    ``root`` (every ancestor searchable by others)."""
    for path in (root.resolve(), *root.resolve().parents):
        if not path.stat().st_mode & 0o001:
            raise SandboxStartError(
                f"sandbox {name!r}: the sandbox root {root} is not reachable by the sandbox's "
                f"unprivileged uid ({path} is not searchable by others); use a root such as "
                f"{Path(tempfile.gettempdir()) / 'apprentice-sandboxes'} "
                "(LocalFactory(root=...) or $APPRENTICE_SANDBOX_ROOT)"
            )


def _plan(spec: SandboxSpec) -> list[dockerfile.Step]:
    directory = spec.environment_dir
    if directory is None:
        return []
    path = directory / "Dockerfile"
    if path.is_file():
        return dockerfile.parse(path, directory)
    if (directory / "docker-compose.yaml").is_file():
        raise UnsupportedDockerfileError(
            directory / "docker-compose.yaml", None, "docker compose environments are not supported"
        )
    if spec.docker_image and directory.is_dir() and any(directory.iterdir()):
        # a prebuilt image with loose files: Harbor uploads them into the workdir
        return [dockerfile.Copy(0, (directory,), spec.workdir, True)]
    return []


def _mode_filter(chmod: int | None):
    def apply(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if chmod is not None:
            info.mode = chmod
        return info

    return apply


def _enter(path: str) -> str:
    quoted = shlex.quote(path)
    return f"mkdir -p -- {quoted} && cd -- {quoted}"


def _unpack(dest: str) -> str:
    quoted = shlex.quote(dest)
    return f'mkdir -p -- {quoted} && tar -x --no-same-owner -f "$in" -C {quoted}'


async def _read_info(fd: int, timeout: float) -> dict | None:
    """bwrap's --info-fd JSON, or None if it exited first."""
    os.set_blocking(fd, False)
    data = b""
    with anyio.move_on_after(timeout):
        while True:
            await anyio.wait_readable(fd)
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                break
            data += chunk
            try:
                return json.loads(data)
            except json.JSONDecodeError:
                continue
    try:
        return json.loads(data) if data else None
    except json.JSONDecodeError:
        return None


# ---- leftovers ----------------------------------------------------------------------------


def reap_leftovers(root: Path | None = None) -> int:
    """Remove sandboxes whose owner process is gone (a crashed or SIGKILLed run): kill their
    processes, delete their directories and cgroups. Returns how many were removed."""
    removed = 0
    for parent in {root or default_root(), control_root()}:
        for home in parent.iterdir() if parent.is_dir() else []:
            try:
                owner = json.loads((home / OWNER_FILE).read_text())
            except (OSError, ValueError):
                continue
            if pid_exists(owner.get("pid")):
                continue
            init_pid = owner.get("init_pid")
            if init_pid and pid_exists(init_pid) and _is_sandbox_init(init_pid):
                namespace = pid_namespace(init_pid)
                if namespace is not None:
                    kill_namespace(namespace)
            if owner.get("control"):
                shutil.rmtree(owner["control"], ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
            removed += 1
    reap_stale()
    return removed


def _is_sandbox_init(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"__apx_ctl" in cmdline
