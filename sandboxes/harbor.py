"""Harbor both ways.

**Harbor environments as Apprentice sandboxes** (``HarborFactory``, ``make_factory("harbor:
<type>")`` or ``make_factory("pkg.module:SomeEnvironment")``): any ``harbor.environments.base.
BaseEnvironment`` — Daytona, Modal, E2B, Runloop, GKE, ... — created through Harbor's own
``EnvironmentFactory`` (by type name) or constructor (by class), started, and driven through
its ``exec``/``upload_*``/``download_*``. Commands run under ``sandboxes.shell``'s wrapper, so
``cd``/``export`` persist and a timed-out command's processes are found by their marker and
killed with a second exec, whatever the provider does on its own timeouts.

**Apprentice backends as Harbor environments** (``ApprenticeLocalEnvironment``,
``ApprenticeDockerEnvironment``): ``harbor run --env
sandboxes.harbor:ApprenticeDockerEnvironment`` (or ``EnvironmentConfig(import_path=...)``) runs
Harbor's own trials, agents and verifier on our sandboxes. They behave like Harbor's stateless
environments: each ``exec`` starts in the task's workdir, and ``timeout_sec`` expiring raises
``RuntimeError`` as Harbor's docker environment does. Nothing is bind-mounted, so Harbor
downloads ``/logs`` after each phase.
"""

from __future__ import annotations

import math
import re
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Self

import anyio
from harbor.environments.base import BaseEnvironment
from harbor.environments.base import ExecResult as HarborExecResult
from harbor.environments.capabilities import (
    EnvironmentCapabilities,
    EnvironmentResourceCapabilities,
)
from harbor.models.task.config import EnvironmentConfig, NetworkMode, NetworkPolicy
from harbor.models.trial.paths import TrialPaths

from sandboxes import cleanup
from sandboxes.errors import SandboxDeadError, SandboxError, SandboxFileError, SandboxStartError
from sandboxes.output import CappedOutput
from sandboxes.shell import EXEC_MARKER, KILL_MARKED, bash_argv
from sandboxes.types import ExecResult, Sandbox, SandboxSpec

KILL_GRACE_S = 5.0
"""Extra time given to the provider's own timeout, so ours (which kills by marker) fires first."""


def is_harbor_environment(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseEnvironment)


def harbor_environment_type(name: str) -> Any:
    """Harbor's ``EnvironmentType`` named ``name`` (``daytona``), or a ``ValueError`` listing
    the types Harbor knows."""
    from harbor.models.environment_type import EnvironmentType

    try:
        return EnvironmentType(name)
    except ValueError:
        choices = ", ".join(t.value for t in EnvironmentType)
        raise ValueError(
            f"unknown Harbor environment type {name!r}; expected one of {choices}"
        ) from None


def harbor_config_from_spec(spec: SandboxSpec) -> EnvironmentConfig:
    """The ``[environment]`` Harbor needs to build ``spec``."""
    return EnvironmentConfig(
        docker_image=spec.docker_image,
        cpus=math.ceil(spec.cpus) if spec.cpus else None,
        memory_mb=spec.memory_mb,
        storage_mb=spec.storage_mb,
        workdir=spec.workdir,
        env=dict(spec.env),
        build_timeout_sec=spec.build_timeout_s,
        network_mode=NetworkMode.PUBLIC if spec.network else NetworkMode.NO_NETWORK,
    )


# ---- Harbor environments as sandboxes -------------------------------------------------------


class HarborFactory:
    """Creates sandboxes from a Harbor environment type name (``"daytona"``) or class.
    ``options`` go to the environment's constructor (Harbor's ``--ek`` kwargs)."""

    def __init__(
        self,
        environment: str | type[BaseEnvironment],
        root: Path | None = None,
        **options: Any,
    ) -> None:
        # A bad name fails here, once, not at each create.
        self.kind = harbor_environment_type(environment) if isinstance(environment, str) else None
        self.environment = environment
        self.options = options
        self.root = root or Path(tempfile.gettempdir()) / "apprentice-harbor"

    async def create(self, spec: SandboxSpec) -> HarborSandbox:
        from harbor.environments.factory import EnvironmentFactory

        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name)[:40] or "sandbox"
        session = f"{slug}__{secrets.token_hex(4)}"
        trial_dir = self.root / session
        paths = TrialPaths(trial_dir=trial_dir)
        paths.mkdir()
        environment_dir = spec.environment_dir or trial_dir / "environment"
        environment_dir.mkdir(parents=True, exist_ok=True)
        policy = NetworkPolicy(
            network_mode=NetworkMode.PUBLIC if spec.network else NetworkMode.NO_NETWORK
        )
        arguments = dict(
            environment_dir=environment_dir,
            environment_name=spec.name,
            session_id=session,
            trial_paths=paths,
            task_env_config=harbor_config_from_spec(spec),
            network_policy=policy,
            persistent_env=dict(spec.env),
            **self.options,
        )
        try:
            if self.kind is not None:
                environment = EnvironmentFactory.create_environment(type=self.kind, **arguments)
            else:
                assert not isinstance(self.environment, str)
                environment = self.environment(**arguments)
        except Exception as exc:
            shutil.rmtree(trial_dir, ignore_errors=True)
            raise SandboxStartError(
                f"sandbox {spec.name!r}: Harbor environment {self._label} could not be "
                f"created: {exc}"
            ) from exc
        sandbox = HarborSandbox(spec, environment, trial_dir)
        try:
            await environment.start(force_build=False)
            ready = await sandbox.exec("mkdir -p /logs/agent /logs/verifier /tests /solution")
            if not ready.ok:
                raise SandboxStartError(
                    f"sandbox {spec.name!r}: Harbor environment {self._label} started but "
                    f"cannot run commands: {ready.stderr.strip() or ready.exit_code}"
                )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await sandbox.close()
            if isinstance(exc, SandboxError | anyio.get_cancelled_exc_class()):
                raise
            if isinstance(exc, Exception):
                raise SandboxStartError(
                    f"sandbox {spec.name!r}: Harbor environment {self._label} failed to "
                    f"start: {exc}"
                ) from exc
            raise
        return sandbox

    @property
    def _label(self) -> str:
        if isinstance(self.environment, str):
            return repr(self.environment)
        return f"{self.environment.__module__}:{self.environment.__qualname__}"


class HarborSandbox:
    """A started Harbor environment, seen through the ``Sandbox`` protocol."""

    def __init__(self, spec: SandboxSpec, environment: BaseEnvironment, trial_dir: Path) -> None:
        self.spec = spec
        self.environment = environment
        self._trial_dir = trial_dir
        self._closed = False
        # At exit or SIGTERM no ``async with`` runs: the trial folder goes, but the environment
        # itself cannot be stopped there (its client lives on the event loop the signal
        # interrupted); a cloud sandbox then ends at its provider's idle timeout.
        cleanup.register(self, lambda: shutil.rmtree(trial_dir, ignore_errors=True))

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        if self._closed:
            raise SandboxDeadError(f"sandbox {self.spec.name!r} is closed")
        timeout = timeout if timeout is not None else self.spec.default_timeout_s
        exec_id = secrets.token_hex(8)
        line = shlex.join(bash_argv(command, cwd, env, self.spec.workdir))
        provider_timeout = math.ceil(timeout + KILL_GRACE_S) if timeout else None
        started = anyio.current_time()
        result: HarborExecResult | None = None
        with anyio.move_on_after(timeout), self._provider("run a command"):
            result = await self.environment.exec(
                line, env={EXEC_MARKER: exec_id}, timeout_sec=provider_timeout
            )
        duration = anyio.current_time() - started
        if result is None:
            shielded = anyio.CancelScope(shield=True)
            with shielded, anyio.move_on_after(30), self._provider("stop a timed-out command"):
                await self.environment.exec(
                    shlex.join(["bash", "-c", KILL_MARKED, "apprentice-kill", exec_id]),
                    timeout_sec=30,
                )
            return ExecResult("", "", None, timed_out=True, duration_s=duration)
        stdout, stderr = (
            CappedOutput(self.spec.max_output_bytes),
            CappedOutput(self.spec.max_output_bytes),
        )
        stdout.feed((result.stdout or "").encode())
        stderr.feed((result.stderr or "").encode())
        return ExecResult(
            stdout=stdout.text(),
            stderr=stderr.text(),
            exit_code=result.return_code,
            duration_s=duration,
            truncated=stdout.truncated or stderr.truncated,
        )

    async def upload_file(self, local: Path, remote: str) -> None:
        with self._provider(f"upload {local} to {remote}", SandboxFileError):
            await self.environment.upload_file(Path(local), remote)

    async def upload_dir(self, local: Path, remote: str) -> None:
        with self._provider(f"upload {local} to {remote}", SandboxFileError):
            await self.environment.upload_dir(Path(local), remote)

    async def download_file(self, remote: str, local: Path) -> None:
        with self._provider(f"download {remote} to {local}", SandboxFileError):
            await self.environment.download_file(remote, Path(local))

    async def download_dir(self, remote: str, local: Path) -> None:
        with self._provider(f"download {remote} to {local}", SandboxFileError):
            await self.environment.download_dir(remote, Path(local))

    @contextmanager
    def _provider(self, what: str, error: type[SandboxError] = SandboxDeadError) -> Iterator[None]:
        """A provider's own exception (an HTTP error, a reset connection) as a ``SandboxError``:
        the episode is then invalid, not a tool error the model reads and is trained on."""
        try:
            yield
        except SandboxError:
            raise
        except Exception as exc:
            kind = type(self.environment).__name__
            raise error(
                f"sandbox {self.spec.name!r}: Harbor environment {kind} could not {what}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self.environment.stop(delete=True)
            finally:
                cleanup.unregister(self)
                shutil.rmtree(self._trial_dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---- Apprentice backends as Harbor environments ---------------------------------------------


_factories: dict[str, Any] = {}


def _factory(backend: str) -> Any:
    if backend not in _factories:
        from sandboxes.factory import make_factory

        _factories[backend] = make_factory(backend)
    return _factories[backend]


class ApprenticeEnvironment(BaseEnvironment):
    """A Harbor environment backed by an Apprentice sandbox (``backend`` names which)."""

    backend: ClassVar[str] = "local"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sandbox: Sandbox | None = None
        super().__init__(*args, **kwargs)

    @property
    def capabilities(self) -> EnvironmentCapabilities:
        return EnvironmentCapabilities(disable_internet=True)

    @classmethod
    def resource_capabilities(cls) -> EnvironmentResourceCapabilities:
        return EnvironmentResourceCapabilities(cpu_limit=True, memory_limit=True)

    def _validate_definition(self) -> None:
        dockerfile = self.environment_dir / "Dockerfile"
        if not dockerfile.is_file() and not self.task_env_config.docker_image:
            raise FileNotFoundError(
                f"{self.environment_dir} has no Dockerfile and [environment].docker_image is "
                f"not set: the {self.type()} environment needs one of them"
            )

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            raise SandboxDeadError(f"{self.type()} environment {self.session_id} is not started")
        return self._sandbox

    async def start(self, force_build: bool) -> None:
        from sandboxes.factory import spec_from_harbor_config

        spec = spec_from_harbor_config(
            self.environment_name,
            self.environment_dir,
            self.task_env_config,
            network=self.network_policy.network_mode == NetworkMode.PUBLIC,
        )
        self._sandbox = await _factory(self.backend).create(spec)
        targets = self._mount_targets()
        if targets:
            result = await self._sandbox.exec(shlex.join(["mkdir", "-p", *targets]))
            if not result.ok:
                raise SandboxStartError(f"{self.type()}: cannot create {targets}: {result.stderr}")

    async def stop(self, delete: bool) -> None:
        if self._sandbox is not None:
            await self._sandbox.close()

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_sec: int | None = None,
        user: str | int | None = None,
    ) -> HarborExecResult:
        user = self._resolve_user(user)
        if user not in (None, "root", 0, "0"):
            raise SandboxError(
                f"{self.type()} runs commands as root only; task {self.environment_name!r} "
                f"asked for user {user!r} (use a Harbor docker environment for other users)"
            )
        result = await self.sandbox.exec(  # type: ignore[call-arg]  (our backends' option)
            command,
            cwd=cwd or self.task_env_config.workdir or self.sandbox.spec.workdir,
            env=self._merge_env(env),
            timeout=timeout_sec,
            persist=False,
        )
        if result.timed_out:
            raise RuntimeError(f"Command timed out after {timeout_sec} seconds")
        return HarborExecResult(
            stdout=result.stdout, stderr=result.stderr, return_code=result.exit_code or 0
        )

    async def upload_file(self, source_path: Path | str, target_path: str) -> None:
        await self.sandbox.upload_file(Path(source_path), target_path)

    async def upload_dir(self, source_dir: Path | str, target_dir: str) -> None:
        await self.sandbox.upload_dir(Path(source_dir), target_dir)

    async def download_file(self, source_path: str, target_path: Path | str) -> None:
        await self.sandbox.download_file(source_path, Path(target_path))

    async def download_dir(self, source_dir: str, target_dir: Path | str) -> None:
        await self.sandbox.download_dir(source_dir, Path(target_dir))


class ApprenticeLocalEnvironment(ApprenticeEnvironment):
    """Harbor environment on Apprentice's bubblewrap backend (no daemon)."""

    backend = "local"

    @staticmethod
    def type() -> str:
        return "apprentice-local"


class ApprenticeDockerEnvironment(ApprenticeEnvironment):
    """Harbor environment on Apprentice's docker SDK backend."""

    backend = "docker"

    @staticmethod
    def type() -> str:
        return "apprentice-docker"
