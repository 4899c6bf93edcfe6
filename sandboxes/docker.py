"""The docker backend: the docker SDK (no compose, no CLI), one container per sandbox.

Images: ``spec.docker_image`` if given, else the task's ``environment/Dockerfile`` built once and
tagged ``apprentice-env:<content hash of the folder>`` (concurrent creates of the same
environment build it once: a lock per tag, then a check for the existing image), else the
factory's ``default_image``.

Containers: the task's cpus/memory/pids limits (no swap), ``network_mode="none"`` unless the
spec allows network, labels ``apprentice.sandbox=1``, ``apprentice.run=<run id>``,
``apprentice.owner=<host>:<pid>:<start time>`` and ``apprentice.task=<name>``. ``close()``
removes the container; a dead owner's containers are removed when the next factory starts;
``sandboxes.cleanup`` removes live ones at exit and on SIGTERM.

Commands: with a local daemon (``exec_mode="spawner"``, the default when the daemon is reached
through a unix socket) the container's pid 1 is the spawner of ``sandboxes.shell`` and the
control directory is bind-mounted from the host: a command costs a couple of milliseconds,
where a ``docker exec`` costs ~60 ms here (runc starts a process per exec). The container's
processes are visible on the host, so a timed-out command is killed by its marker from outside
(``sandboxes.procs``). With a remote daemon (``exec_mode="api"``) commands go through
``exec_create``/``exec_start`` (demultiplexed, streamed with the output cap) and a timeout kills
the command's processes with a second exec. Either way, pid 1 reaps orphans.

Blocking SDK calls run in worker threads (``anyio.to_thread``); one client per factory, with a
connection pool sized for many concurrent sandboxes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Self

import anyio
from anyio.lowlevel import RunVar
from harbor.environments.definition import should_upload_environment_dir

from sandboxes import cleanup
from sandboxes.channel import SpawnerChannel
from sandboxes.errors import (
    DockerUnavailableError,
    SandboxBuildError,
    SandboxDeadError,
    SandboxFileError,
    SandboxStartError,
)
from sandboxes.hostfs import host_tar_filter, make_dirs
from sandboxes.local import OWNER_FILE, control_root, default_root, reap_leftovers
from sandboxes.output import CappedOutput
from sandboxes.procs import kill_command, pid_namespace
from sandboxes.shell import (
    CONTROL_DIR,
    EXEC_MARKER,
    STATE_DIR,
    bash_argv,
    kill_marked_argv,
    spawner_argv,
)
from sandboxes.types import ExecResult, SandboxSpec

logger = logging.getLogger(__name__)

LABEL = "apprentice.sandbox"
RUN_LABEL = "apprentice.run"
OWNER_LABEL = "apprentice.owner"
TASK_LABEL = "apprentice.task"
IMAGE_REPOSITORY = "apprentice-env"
DEFAULT_IMAGE = "debian:bookworm-slim"
ExecMode = Literal["auto", "spawner", "api"]
_client_lock = threading.Lock()
_endpoint_lock = threading.Lock()
"""Held around container start and removal on daemons that need it (``needs_endpoint_lock``)."""


def needs_endpoint_lock(server_version: str) -> bool:
    """Whether to start and remove containers one at a time with this daemon.

    dockerd before 23.0 (its vendored libnetwork; e.g. Debian bookworm's docker.io 20.10.24) can
    deadlock when containers' network endpoints are created and deleted at the same time
    (moby/moby#46661, fixed upstream by moby/moby#42545): every later call then hangs, the whole
    daemon with it. Seen here once in a fresh CI run: 64 sandboxes removed while others started.
    Serialising the two operations in this process avoids it; newer daemons run them
    concurrently."""
    major = re.match(r"(\d+)\.", server_version or "")
    return major is not None and int(major.group(1)) < 23


def docker_available(timeout: float = 5.0) -> str | None:
    """None when a docker daemon answers, else the reason it does not (for skips/errors)."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed (pip install docker)"
    try:
        client = docker.from_env(timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return f"no docker daemon answered at {host}: {exc}"
    return None


def owner_id(pid: int | None = None) -> str:
    """``host:pid:start time`` of a process: survives pid reuse when checking for leftovers."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "?"
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def _owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's sandbox: not ours to judge
    return _start_time(int(pid)) == start


@dataclass
class DockerFactory:
    """Creates docker sandboxes. ``run_id`` labels this run's containers (default: random)."""

    client: Any = None
    """A ``docker.APIClient``; default: from the environment (``DOCKER_HOST``...)."""
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    default_image: str = DEFAULT_IMAGE
    exec_mode: ExecMode = "auto"
    root: Path = field(default_factory=default_root)
    """Where the local backend's leftovers are reaped too (control folders live on tmpfs)."""
    builds: int = 0
    """Images this factory built (a test checks concurrent creates build once)."""

    def __post_init__(self) -> None:
        self._reaped = False
        self._locks: RunVar[dict[str, anyio.Lock]] = RunVar(f"docker-build-locks-{id(self)}")
        self._timed_out: dict[str, str] = {}
        """Tags whose build outlived ``build_timeout_s``: the build thread cannot be stopped
        and may still finish; until it does, creates fail fast instead of building again."""

    @property
    def api(self) -> Any:
        with _client_lock:
            return self._connect()

    def _connect(self) -> Any:
        if self.client is None:
            try:
                import docker

                self.client = docker.from_env(max_pool_size=128, timeout=120).api
                self.client.ping()
            except Exception as exc:
                self.client = None
                raise DockerUnavailableError(
                    f"docker backend: no docker daemon answered "
                    f"({os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')}): {exc}. "
                    "Start dockerd (see .ci/run) or use the local backend"
                ) from exc
        return self.client

    @functools.cached_property
    def endpoint_guard(self) -> contextlib.AbstractContextManager:
        """The lock to hold while starting or removing a container (a no-op on new daemons)."""
        version = self.api.version().get("Version", "")
        return _endpoint_lock if needs_endpoint_lock(version) else contextlib.nullcontext()

    @property
    def mode(self) -> Literal["spawner", "api"]:
        if self.exec_mode != "auto":
            return self.exec_mode
        return "spawner" if str(self.api.base_url).startswith("http+docker://") else "api"

    async def create(self, spec: SandboxSpec) -> DockerSandbox:
        await anyio.to_thread.run_sync(lambda: self.api)
        if not self._reaped:
            self._reaped = True
            await self.reap()
        image = await self.image_for(spec)
        return await DockerSandbox.start(self, spec, image)

    async def reap(self) -> int:
        """Remove containers (and control folders) whose owner process is gone."""
        api = self.api

        def reap() -> int:
            removed = 0
            for container in api.containers(all=True, filters={"label": f"{LABEL}=1"}):
                owner = container["Labels"].get(OWNER_LABEL, "")
                if owner and not _owner_alive(owner):
                    with contextlib.suppress(Exception):
                        with self.endpoint_guard:
                            api.remove_container(container["Id"], force=True)
                        removed += 1
            reap_leftovers(self.root)
            return removed

        removed = await anyio.to_thread.run_sync(reap)
        if removed:
            logger.info("removed %d leftover sandbox container(s) of dead runs", removed)
        return removed

    async def image_for(self, spec: SandboxSpec) -> str:
        if spec.docker_image:
            await anyio.to_thread.run_sync(self._require_image, spec.docker_image, spec.name)
            return spec.docker_image
        directory = spec.environment_dir
        if directory is None or not (directory / "Dockerfile").is_file():
            if directory is not None and (directory / "docker-compose.yaml").is_file():
                raise SandboxBuildError(
                    f"task {spec.name!r}: {directory / 'docker-compose.yaml'}: docker compose "
                    "environments are not supported; use a Harbor environment (harbor:docker)"
                )
            await anyio.to_thread.run_sync(self._require_image, self.default_image, spec.name)
            return self.default_image
        from harbor.environments.definition import environment_content_hash

        tag = f"{IMAGE_REPOSITORY}:{environment_content_hash(directory, truncate=16)}"
        try:
            locks = self._locks.get()
        except LookupError:
            locks = {}
            self._locks.set(locks)
        lock = locks.setdefault(tag, anyio.Lock())
        async with lock:
            if await anyio.to_thread.run_sync(self._has_image, tag):
                return tag
            if tag in self._timed_out:
                raise SandboxBuildError(self._timed_out[tag])
            try:
                with anyio.fail_after(spec.build_timeout_s):
                    await anyio.to_thread.run_sync(
                        self._build, directory, tag, spec.name, abandon_on_cancel=True
                    )
            except TimeoutError:
                self._timed_out[tag] = (
                    f"task {spec.name!r}: building {directory / 'Dockerfile'} took longer than "
                    f"build_timeout_s={spec.build_timeout_s:g} ([environment].build_timeout_sec "
                    "in task.toml); raise it, or build the image beforehand"
                )
                raise SandboxBuildError(self._timed_out[tag]) from None
            self.builds += 1
        return tag

    def _has_image(self, image: str) -> bool:
        import docker

        try:
            self.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False

    def _require_image(self, image: str, name: str) -> None:
        if self._has_image(image):
            return
        try:
            self.api.pull(image)
        except Exception as exc:
            raise SandboxStartError(
                f"task {name!r}: image {image!r} is not present locally and pulling it failed "
                f"({exc}); build or load it first (docker images lists what is there)"
            ) from exc

    def _build(self, directory: Path, tag: str, name: str) -> None:
        log: list[str] = []
        started = time.monotonic()
        try:
            for chunk in self.api.build(
                path=str(directory),
                tag=tag,
                rm=True,
                forcerm=True,
                decode=True,
                labels={"apprentice.environment": name},
            ):
                if "stream" in chunk:
                    log.extend(line for line in chunk["stream"].splitlines() if line.strip())
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("error") or chunk["errorDetail"].get("message", "")
                    tail = "\n".join(log[-15:])
                    raise SandboxBuildError(
                        f"task {name!r}: building {directory / 'Dockerfile'} failed: "
                        f"{detail.strip()}\n--- last build output ---\n{tail}"
                    )
        except SandboxBuildError:
            raise
        except Exception as exc:
            raise SandboxBuildError(
                f"task {name!r}: building {directory / 'Dockerfile'} failed: {exc}"
            ) from exc
        logger.info("built %s for %s in %.1fs", tag, name, time.monotonic() - started)


class DockerSandbox:
    """One container. Create with ``await DockerFactory().create(spec)``."""

    def __init__(self, factory: DockerFactory, spec: SandboxSpec, image: str) -> None:
        self.spec = spec
        self.image = image
        self.container_id: str | None = None
        self._factory = factory
        self._api = factory.api
        self._mode = factory.mode
        self._home: Path | None = None
        self._request_fd = -1
        self._channel: SpawnerChannel | None = None
        self._start_env: list[str] = []
        self._init_pid: int | None = None
        self._namespace: str | None = None
        """The container's pid namespace when its processes are visible here (local daemon)."""
        self._closed = False

    # ---- creation -------------------------------------------------------------------------

    @classmethod
    async def start(cls, factory: DockerFactory, spec: SandboxSpec, image: str) -> Self:
        sandbox = cls(factory, spec, image)
        cleanup.register(sandbox, sandbox._remove_now)
        try:
            await sandbox._start()
            # first command: proves the spawner answers and creates the standard dirs
            ready = await sandbox.exec(
                "mkdir -p /logs/agent /logs/verifier /tests /solution "
                f"{shlex.quote(spec.workdir)} && cd {shlex.quote(spec.workdir)}",
                timeout=60,
            )
            if not ready.ok:
                raise SandboxStartError(
                    f"sandbox {spec.name!r} (image {image}) started but cannot run commands: "
                    f"{ready.stderr.strip() or ready.stdout.strip() or ready.exit_code}"
                )
            if spec.environment_dir is not None and should_upload_environment_dir(
                spec.environment_dir, docker_image=spec.docker_image
            ):
                # a prebuilt image plus loose files: Harbor copies them into the workdir
                await sandbox.upload_dir(spec.environment_dir, spec.workdir)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sandbox.close()
            raise
        return sandbox

    async def _start(self) -> None:
        spec, factory = self.spec, self._factory
        slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", spec.name)[:40].strip("-.") or "sandbox"
        labels = {
            LABEL: "1",
            RUN_LABEL: factory.run_id,
            OWNER_LABEL: owner_id(),
            TASK_LABEL: spec.name[:200],
        }
        binds: dict[str, dict[str, str]] = {}
        if self._mode == "spawner":
            parent = control_root()
            make_dirs(parent, exist_ok=True)
            self._home = parent / f"docker-{slug}-{os.getpid()}-{secrets.token_hex(4)}"
            control = self._home / "ctl"
            make_dirs(control)
            (self._home / OWNER_FILE).write_text(json.dumps({"pid": os.getpid()}))
            os.mkfifo(control / "requests", 0o600)
            self._request_fd = os.open(control / "requests", os.O_RDWR | os.O_NONBLOCK)
            binds[str(control)] = {"bind": CONTROL_DIR, "mode": "rw"}
            command = spawner_argv(request_fifo=f"{CONTROL_DIR}/requests")
        else:
            command = ["sleep", "infinity"]

        def create() -> tuple[str, dict]:
            import docker

            ulimits = []
            if spec.cpu_time_s:
                seconds = int(spec.cpu_time_s)
                ulimits.append(docker.types.Ulimit(name="cpu", soft=seconds, hard=seconds))
            host_config = self._api.create_host_config(
                binds=binds or None,
                network_mode="bridge" if spec.network else "none",
                nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
                mem_limit=f"{spec.memory_mb}m" if spec.memory_mb else None,
                memswap_limit=f"{spec.memory_mb}m" if spec.memory_mb else None,
                pids_limit=spec.pids_limit or None,
                init=self._mode == "api",
                ulimits=ulimits or None,
                auto_remove=self._mode == "spawner",
                # the shell state is rewritten by every command: keep it off the disk
                tmpfs={STATE_DIR: "rw,mode=700,size=16m"},
            )
            container = self._api.create_container(
                self.image,
                command=command,
                entrypoint=[],
                working_dir=spec.workdir,
                environment=spec.env or None,
                labels=labels,
                hostname=slug.lower()[:63],
                name=f"apprentice-{slug}-{secrets.token_hex(4)}",
                host_config=host_config,
                volumes=[CONTROL_DIR] if binds else None,
                detach=True,
            )
            self.container_id = container["Id"]
            with self._factory.endpoint_guard:
                self._api.start(container["Id"])
            return container["Id"], self._api.inspect_container(container["Id"])

        try:
            _, info = await anyio.to_thread.run_sync(create)
        except Exception as exc:
            raise SandboxStartError(
                f"sandbox {spec.name!r}: starting a container from image {self.image} failed: {exc}"
            ) from exc
        self._start_env = [e.split("=", 1)[0] for e in info["Config"].get("Env") or []]
        self._init_pid = info["State"].get("Pid") or None
        self._namespace = _local_pid_namespace(info)
        if self._mode == "spawner":
            if self._namespace is None:
                raise SandboxStartError(
                    f"sandbox {spec.name!r}: the container's processes are not visible on this "
                    "host (is the docker daemon remote?); use DockerFactory(exec_mode='api')"
                )
            pid = info["State"]["Pid"]
            assert self._home is not None
            self._channel = SpawnerChannel(
                sandbox_name=spec.name,
                control_dir=self._home / "ctl",
                request_fd=os.dup(self._request_fd),
                init_pid=pid,
                workdir=spec.workdir,
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
        if self._closed or self.container_id is None:
            raise SandboxDeadError(f"sandbox {self.spec.name!r} is closed")
        timeout = timeout if timeout is not None else self.spec.default_timeout_s
        if self._channel is not None:
            result, _ = await self._channel.run(
                command,
                cwd=cwd,
                env=env,
                timeout=timeout,
                max_output_bytes=self.spec.max_output_bytes,
                persist=persist,
            )
            return result
        return await self._exec_api(command, cwd, env, timeout, persist)

    async def _exec_api(
        self,
        command: str,
        cwd: str | None,
        env: dict[str, str] | None,
        timeout: float | None,
        persist: bool,
    ) -> ExecResult:
        import docker
        import requests

        exec_id = secrets.token_hex(8)
        argv = bash_argv(command, cwd, env, self.spec.workdir, self._start_env, persist)
        stdout = CappedOutput(self.spec.max_output_bytes)
        stderr = CappedOutput(self.spec.max_output_bytes)
        started = time.monotonic()
        finished = threading.Event()

        def run() -> int | None:
            try:
                created = self._api.exec_create(
                    self.container_id, argv, environment={EXEC_MARKER: exec_id}
                )
                stream = self._api.exec_start(created["Id"], stream=True, demux=True)
                for out, err in stream:
                    if out:
                        stdout.feed(out)
                    if err:
                        stderr.feed(err)
                return self._api.exec_inspect(created["Id"])["ExitCode"]
            except docker.errors.NotFound as exc:
                raise SandboxDeadError(
                    f"sandbox {self.spec.name!r}: its container is gone ({exc})"
                ) from exc
            except docker.errors.APIError as exc:
                what = "its container stopped" if "is not running" in str(exc) else "exec failed"
                raise SandboxDeadError(f"sandbox {self.spec.name!r}: {what} ({exc})") from exc
            except (docker.errors.DockerException, requests.RequestException) as exc:
                raise SandboxDeadError(
                    f"sandbox {self.spec.name!r}: the docker daemon did not answer "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            finally:
                finished.set()

        exit_code: int | None = None
        timed_out = False
        try:
            with anyio.move_on_after(timeout) as scope:
                exit_code = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
            timed_out = scope.cancelled_caught
        finally:
            if not finished.is_set():
                with anyio.CancelScope(shield=True):
                    await self._kill_api(exec_id)
                    await anyio.to_thread.run_sync(finished.wait, 5)
        return ExecResult(
            stdout=stdout.text(),
            stderr=stderr.text(),
            exit_code=None if timed_out else exit_code,
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
            truncated=stdout.truncated or stderr.truncated,
        )

    async def _kill_api(self, exec_id: str) -> None:
        """From the host when the daemon is local (works even when a fork bomb leaves no pid
        for another exec), else with an exec that scans the container's /proc."""
        if self._namespace is not None:
            await anyio.to_thread.run_sync(kill_command, self._namespace, exec_id, self._init_pid)
            return

        def kill() -> None:
            created = self._api.exec_create(self.container_id, kill_marked_argv(exec_id))
            self._api.exec_start(created["Id"])

        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(kill)

    async def upload_file(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_file():
            raise FileNotFoundError(f"upload_file: {local} is not a file")
        await self._put(local, remote)

    async def upload_dir(self, local: Path, remote: str) -> None:
        local = Path(local)
        if not local.is_dir():
            raise FileNotFoundError(f"upload_dir: {local} is not a directory")
        await self._put(local, remote)

    async def download_file(self, remote: str, local: Path) -> None:
        data = await self._get(remote)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            extracted = tar.extractfile(member) if member is not None else None
            if extracted is None:
                raise SandboxFileError(
                    f"sandbox {self.spec.name!r}: download_file {remote}: not a regular file"
                )
            content = extracted.read()
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(content)

    async def download_dir(self, remote: str, local: Path) -> None:
        data = await self._get(remote)
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = []
            for member in tar.getmembers():
                # docker names entries after the folder itself: strip that first component
                parts = PurePosixPath(member.name).parts[1:]
                if not parts:
                    continue
                member.name = str(PurePosixPath(*parts))
                members.append(member)
            tar.extractall(local, members=members, filter=host_tar_filter)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cleanup.unregister(self)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._remove_now)

    def _remove_now(self) -> None:
        import docker

        if self._channel is not None:
            self._channel.close()
        if self.container_id is not None:
            with (
                contextlib.suppress(docker.errors.NotFound, docker.errors.APIError),
                self._factory.endpoint_guard,
            ):
                self._api.remove_container(self.container_id, force=True)
        if self._request_fd >= 0:
            os.close(self._request_fd)
            self._request_fd = -1
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"DockerSandbox({self.spec.name!r}, container={(self.container_id or '')[:12]})"

    # ---- files ----------------------------------------------------------------------------

    async def _put(self, local: Path, remote: str) -> None:
        import docker
        import requests

        if self._closed or self.container_id is None:
            raise SandboxDeadError(f"sandbox {self.spec.name!r} is closed")
        target = PurePosixPath(remote)
        if not target.is_absolute():
            target = PurePosixPath(self.spec.workdir, remote)
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(local, arcname=str(target).lstrip("/") or ".", filter=_as_root)
        try:
            ok = await anyio.to_thread.run_sync(
                self._api.put_archive, self.container_id, "/", archive.getvalue()
            )
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise SandboxFileError(
                f"sandbox {self.spec.name!r}: upload {local} to {remote} failed: {exc}"
            ) from exc
        if not ok:
            raise SandboxFileError(f"sandbox {self.spec.name!r}: upload {local} to {remote} failed")

    async def _get(self, remote: str) -> bytes:
        import docker
        import requests

        if self._closed or self.container_id is None:
            raise SandboxDeadError(f"sandbox {self.spec.name!r} is closed")

        def get() -> bytes:
            stream, _ = self._api.get_archive(self.container_id, remote)
            return b"".join(stream)

        try:
            return await anyio.to_thread.run_sync(get)
        except docker.errors.NotFound as exc:
            raise SandboxFileError(
                f"sandbox {self.spec.name!r}: {remote} does not exist in the container"
            ) from exc
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise SandboxFileError(
                f"sandbox {self.spec.name!r}: download {remote} failed: {exc}"
            ) from exc


def _local_pid_namespace(info: dict) -> str | None:
    """The pid namespace of a container whose pid 1 runs on this host, else None (a remote
    daemon's pid may name an unrelated local process: the cgroup path must name the
    container)."""
    pid = info["State"].get("Pid") or 0
    try:
        cgroups = Path(f"/proc/{pid}/cgroup").read_text() if pid else ""
    except OSError:
        return None
    return pid_namespace(pid) if info["Id"] in cgroups else None


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
