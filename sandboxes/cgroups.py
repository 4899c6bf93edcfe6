"""Per-sandbox cgroups for the local backend: pids, memory and CPU limits on a whole tree.

rlimits are per process (a fork bomb of small processes, or many 100 MB processes, passes
them), so the local backend puts each sandbox's pid 1 into its own cgroup when the host lets
it. Both layouts are handled:

- **v1** (one hierarchy per controller, as on this machine and under docker's cgroupfs
  driver): ``<controller mount>/<our cgroup>/apprentice/<sandbox>`` for ``pids``, ``memory``
  and ``cpu``, nested under our own cgroup so a sandbox is charged to the same budget as us;
- **v2** (unified): ``<root>/apprentice/<sandbox>``, when we run in the root of our cgroup
  namespace (a container's usual view) and may enable the controllers there.

Elsewhere ``Cgroup.create`` returns None and the backend falls back to rlimits (see
``docs/sandboxes.md``). Leaf names carry the owner pid so leftovers of a killed run are removed
by ``reap_stale``.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandboxes.procs import pid_exists

CONTROLLERS = ("pids", "memory", "cpu")
GROUP = "apprentice"


def _mounts() -> tuple[Path | None, dict[str, Path]]:
    """(v2 mount, {v1 controller: mount})."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            path, fstype, options = Path(parts[1]), parts[2], parts[3].split(",")
            if fstype == "cgroup2" and unified is None:
                unified = path
            elif fstype == "cgroup":
                for name in CONTROLLERS:
                    if name in options:
                        v1.setdefault(name, path)
    return unified, v1


def _own_paths() -> dict[str, str]:
    """Our cgroup per v1 controller, and under "" the v2 one."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


@dataclass
class Cgroup:
    """One sandbox's leaf cgroup(s): one directory per v1 controller, or one v2 directory."""

    name: str
    paths: list[Path]
    limits: list[str] = field(default_factory=list)
    """Which limits are enforced, for logs and docs (e.g. ``pids.max=512``)."""

    @classmethod
    def parents(cls) -> dict[str, Path]:
        """Where sandboxes' cgroups go, per controller ("" for v2); empty if unusable."""
        unified, v1 = _mounts()
        own = _own_paths()
        if v1:
            parents = {}
            for name, mount in v1.items():
                parent = mount / own.get(name, "/").lstrip("/") / GROUP
                if _ensure_dir(parent):
                    parents[name] = parent
            return parents
        if unified is not None and own.get("", "/") == "/":
            try:
                wanted = " ".join(f"+{c}" for c in CONTROLLERS)
                (unified / "cgroup.subtree_control").write_text(wanted)
                parent = unified / GROUP
                if _ensure_dir(parent):
                    (parent / "cgroup.subtree_control").write_text(wanted)
                    return {"": parent}
            except OSError:
                return {}
        return {}

    @classmethod
    def create(
        cls, name: str, *, pids: int | None, memory_mb: int | None, cpus: float | None
    ) -> Cgroup | None:
        parents = cls.parents()
        if not parents:
            return None
        leaf = f"{name}-{os.getpid()}"
        group = cls(leaf, [])
        try:
            for controller, parent in parents.items():
                path = parent / leaf
                path.mkdir()
                group.paths.append(path)
                group._limit(controller, path, pids=pids, memory_mb=memory_mb, cpus=cpus)
        except OSError:
            group.remove()
            return None
        return group

    def _limit(
        self,
        controller: str,
        path: Path,
        *,
        pids: int | None,
        memory_mb: int | None,
        cpus: float | None,
    ) -> None:
        v2 = controller == ""
        if pids and controller in ("pids", ""):
            _write(path / "pids.max", str(pids))
            self.limits.append(f"pids.max={pids}")
        if memory_mb and controller in ("memory", ""):
            limit = str(memory_mb * 1024 * 1024)
            if v2:
                _write(path / "memory.max", limit)
                _write(path / "memory.swap.max", "0", optional=True)
            else:
                _write(path / "memory.limit_in_bytes", limit)
                _write(path / "memory.memsw.limit_in_bytes", limit, optional=True)
            self.limits.append(f"memory={memory_mb}MB")
        if cpus and controller in ("cpu", ""):
            period = 100_000
            quota = max(int(cpus * period), 1000)
            if v2:
                _write(path / "cpu.max", f"{quota} {period}")
            else:
                _write(path / "cpu.cfs_period_us", str(period))
                _write(path / "cpu.cfs_quota_us", str(quota))
            self.limits.append(f"cpus={cpus}")

    def add(self, pid: int) -> None:
        for path in self.paths:
            (path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for path in self.paths:
            _rmdir_when_empty(path)
        self.paths = []


def reap_stale() -> int:
    """Remove empty sandbox cgroups whose owner process is gone. Returns how many."""
    removed = 0
    for parent in Cgroup.parents().values():
        with contextlib.suppress(OSError):
            for entry in parent.iterdir():
                owner = entry.name.rsplit("-", 1)[-1]
                if entry.is_dir() and owner.isdigit() and not pid_exists(int(owner)):
                    with contextlib.suppress(OSError):
                        entry.rmdir()
                        removed += 1
    return removed


def _ensure_dir(path: Path) -> bool:
    try:
        path.mkdir(exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise


def _rmdir_when_empty(path: Path, wait_s: float = 2.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
