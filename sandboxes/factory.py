"""Choosing a backend by name, and turning a Harbor task's ``[environment]`` into a spec.

    make_factory("local")                 bubblewrap (default; no daemon)
    make_factory("docker")                docker SDK
    make_factory("harbor:daytona")        any Harbor environment type, through Harbor's factory
    make_factory("pkg.module:attr")       a SandboxFactory (class, instance or zero-arg
                                          callable) or a Harbor BaseEnvironment subclass

Every factory comes wrapped in ``BoundedFactory`` (bounded concurrent creation).
"""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

from sandboxes.errors import SandboxError
from sandboxes.pool import BoundedFactory
from sandboxes.types import SandboxFactory, SandboxSpec

logger = logging.getLogger(__name__)

BACKENDS = ("local", "docker", "harbor:<type>", "module:attr")


def make_factory(backend: str = "local", *, max_concurrent_creates: int = 0, **options: Any):
    """A sandbox factory for ``backend`` (see the module docstring). ``options`` go to the
    backend's constructor (e.g. ``root=`` for local, ``run_id=`` for docker)."""
    inner = _backend(backend, options)
    return BoundedFactory(inner, max_concurrent_creates)


def check_backend_name(backend: str) -> str:
    """``backend`` if ``make_factory`` understands it, else a ``ValueError`` saying what is
    expected: the Harbor type of ``harbor:<type>`` must be one Harbor knows, and a
    ``module:attr`` must import. Nothing is constructed or started (configs call this when they
    are validated; whether a daemon answers is for the recipe to check)."""
    if backend in ("local", "docker"):
        return backend
    if backend.startswith("harbor:"):
        from sandboxes.harbor import harbor_environment_type

        harbor_environment_type(backend.removeprefix("harbor:"))
        return backend
    if ":" in backend:
        _import_backend(backend)
        return backend
    raise ValueError(f"unknown sandbox backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _import_backend(backend: str) -> Any:
    module_name, _, attr = backend.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # a missing module or a user module that fails on import
        raise ValueError(
            f"sandbox backend {backend!r}: cannot import it: {type(exc).__name__}: {exc}"
        ) from exc


def _backend(backend: str, options: dict[str, Any]) -> SandboxFactory:
    if backend == "local":
        from sandboxes.local import LocalFactory

        return LocalFactory(**options)
    if backend == "docker":
        from sandboxes.docker import DockerFactory

        return DockerFactory(**options)
    if backend.startswith("harbor:"):
        from sandboxes.harbor import HarborFactory

        return HarborFactory(environment=backend.removeprefix("harbor:"), **options)
    if ":" in backend:
        target = _import_backend(backend)
        from sandboxes.harbor import HarborFactory, is_harbor_environment

        if is_harbor_environment(target):
            return HarborFactory(environment=target, **options)
        factory = target(**options) if callable(target) else target
        if not hasattr(factory, "create"):
            raise ValueError(
                f"sandbox backend {backend!r} is neither a SandboxFactory (an object with "
                "async create(spec)) nor a Harbor BaseEnvironment subclass"
            )
        return factory
    raise ValueError(f"unknown sandbox backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def spec_from_harbor_config(
    name: str,
    environment_dir: Path | None,
    config: Any = None,
    *,
    network: bool | None = None,
) -> SandboxSpec:
    """A ``SandboxSpec`` from a Harbor task's ``[environment]`` (``harbor.models.task.config.
    EnvironmentConfig``; None means Harbor's defaults).

    - network: on only when the task asks for it explicitly (``network_mode = "public"`` or
      the legacy ``allow_internet = true``); Harbor's own default is public, ours is none.
      ``allowlist`` cannot be enforced by our backends and is refused. ``network`` overrides.
    - workdir: ``[environment].workdir``, else the Dockerfile's last WORKDIR, else /app.
    - env: resolved like Harbor does (``${VAR}`` / ``${VAR:-default}`` from the host).
    - cpus, memory_mb, storage_mb, docker_image, build_timeout_sec: copied.
    """
    from harbor.models.task.config import EnvironmentConfig, NetworkMode
    from harbor.utils.env import resolve_env_vars

    config = config or EnvironmentConfig()
    if config.gpus:
        raise SandboxError(f"task {name!r} needs {config.gpus} GPU(s); no backend here has GPUs")
    if network is None:
        mode = config.network_mode
        if mode == NetworkMode.ALLOWLIST:
            raise SandboxError(
                f"task {name!r}: network_mode='allowlist' ({', '.join(config.allowed_hosts or [])})"
                " cannot be enforced here (a sandbox has no network or all of it); set "
                "network_mode to 'public' or 'no-network' in its task.toml"
            )
        network = mode == NetworkMode.PUBLIC and "network_mode" in config.model_fields_set
    environment_dir = Path(environment_dir) if environment_dir is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = resolve_env_vars(config.env) if config.env else {}
    return SandboxSpec(
        name=name,
        environment_dir=environment_dir,
        docker_image=config.docker_image,
        workdir=config.workdir or _dockerfile_workdir(environment_dir) or "/app",
        cpus=config.cpus,
        memory_mb=config.memory_mb,
        storage_mb=config.storage_mb,
        network=network,
        env=env,
        build_timeout_s=float(config.build_timeout_sec),
    )


def _dockerfile_workdir(environment_dir: Path | None) -> str | None:
    """The Dockerfile's last WORKDIR, with ``ENV``/``ARG`` values substituted as the local
    backend's parser does; for what it refuses (multi-stage builds: docker only), the last
    stage's literal WORKDIR, or None when it names a variable."""
    if environment_dir is None or not (environment_dir / "Dockerfile").is_file():
        return None
    from sandboxes.dockerfile import Workdir, parse, read_instructions

    try:
        steps = parse(environment_dir / "Dockerfile", environment_dir)
    except (OSError, SandboxError):
        pass
    else:
        workdirs = [step.path for step in steps if isinstance(step, Workdir)]
        return workdirs[-1] if workdirs else None
    workdir: str | None = None
    try:
        for instruction in read_instructions(environment_dir / "Dockerfile"):
            if instruction.keyword == "FROM":
                workdir = None
            elif instruction.keyword == "WORKDIR":
                target = instruction.args.strip().strip("\"'")
                workdir = str(PurePosixPath(workdir or "/", target))
    except (OSError, SandboxError):
        return None
    if workdir and "$" in workdir:
        return None
    return workdir
