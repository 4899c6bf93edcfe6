"""Finding and killing a sandbox's processes from the host.

A sandbox's processes are exactly those in its pid namespace (bubblewrap's or the
container's). One command's processes are those that carry its ``APPRENTICE_EXEC`` marker in
their environment, plus everything in their process groups (a job that clears its environment
but stays in the group is still caught). Killing stops every match first, then kills, and
repeats until a scan finds nothing, so a fork bomb cannot outrun it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from sandboxes.shell import EXEC_MARKER


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes_in_namespace(namespace: str) -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and pid_namespace(int(entry.name)) == namespace:
            yield int(entry.name)


def _has_marker(pid: int, exec_id: bytes) -> bool:
    prefix = f"{EXEC_MARKER}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return False
    return any(e.startswith(prefix) and exec_id in e[len(prefix) :].split(b":") for e in entries)


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields restart after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


def kill_command(namespace: str, exec_id: str, spare: int | None = None, rounds: int = 50) -> int:
    """SIGKILL every process of one command inside ``namespace``; never ``spare`` (the
    sandbox's pid 1). Returns how many processes were killed."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = [p for p in processes_in_namespace(namespace) if p != spare]
        marked = [p for p in pids if _has_marker(p, exec_id.encode())]
        groups = {g for g in map(_pgid, marked) if g is not None and g != spare}
        targets = [p for p in pids if p in marked or _pgid(p) in groups]
        targets = [p for p in targets if _alive(p)]
        if not targets:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        killed.update(targets)
    return len(killed)


def kill_namespace(namespace: str, spare: int | None = None, rounds: int = 50) -> None:
    """SIGKILL every process in ``namespace`` except ``spare``."""
    for _ in range(rounds):
        targets = [p for p in processes_in_namespace(namespace) if p != spare and _alive(p)]
        if not targets:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)


def pid_exists(pid: int | None) -> bool:
    """Whether a process with this pid exists (zombies included; another user's too)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (a zombie is dead, just not reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")
