"""What only the bubblewrap backend promises: the host's root is read-only, host secrets are
absent, the sandbox runs as its own unprivileged host uid, and it starts fast enough to be the
default. Also its CPU-time limit (``RLIMIT_CPU`` on pid 1, inherited by every command)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from sandboxes.errors import SandboxStartError
from sandboxes.local import LocalFactory, LocalSandbox
from sandboxes.procs import _alive, processes_in_namespace
from sandboxes.types import Sandbox, SandboxSpec

pytestmark = [pytest.mark.anyio, pytest.mark.bwrap]


def _living(namespace: str) -> list[int]:
    """Processes of a pid namespace that are not zombies."""
    return [p for p in processes_in_namespace(namespace) if _alive(p)]


@pytest.fixture
async def sandbox(local_factory: LocalFactory):
    async with await local_factory.create(SandboxSpec(name="isolation")) as sandbox:
        yield sandbox


@pytest.mark.parametrize("path", ["/etc/evil", "/usr/bin/evil", "/opt/evil", "/var/evil", "/evil"])
async def test_writes_outside_the_workspace_fail(sandbox: Sandbox, path: str) -> None:
    result = await sandbox.exec(f"echo x > {path}")
    assert result.exit_code == 1
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert not Path(path).exists()


async def test_workspace_directories_are_writable(sandbox: Sandbox) -> None:
    for path in ("/app", "/tmp", "/logs/agent", "/logs/verifier", "/tests", "/solution", "/root"):
        result = await sandbox.exec(f"echo ok > {path}/probe && cat {path}/probe")
        assert result.stdout == "ok\n", (path, result)


async def test_host_secrets_are_not_visible(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = Path("/root") / f".apprentice-probe-{tmp_path.name}"
    planted = os.access("/root", os.W_OK)
    if planted:
        secret.write_text("host secret")
    try:
        # the sandbox's /root is its own, empty
        assert (await sandbox.exec("ls -A /root; cat /root/.apprentice-probe-*")).stdout == ""
    finally:
        if planted:
            secret.unlink()
    for missing in ("/home", "/work", "/mnt", "/srv", "/var/lib/docker/containers"):
        result = await sandbox.exec(f"ls {missing}")
        assert result.exit_code == 2 and "No such file or directory" in result.stderr, missing
    logs = await sandbox.exec("ls -A /var/log /var/tmp")
    assert logs.stdout.split() == ["/var/log:", "/var/tmp:"]


async def test_runs_as_its_own_unprivileged_host_uid(sandbox: LocalSandbox) -> None:
    inside = await sandbox.exec("id -u; echo $$ > /tmp/me; sleep 0.5 & echo $! > /tmp/bg; wait")
    assert inside.stdout.splitlines()[0] == "0"  # root inside...
    host_uids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == sandbox._channel.namespace:
                    host_uids.add(entry.stat().st_uid)
            except OSError:
                continue
    assert host_uids and 0 not in host_uids  # ...nobody on the host
    if os.geteuid() == 0:
        assert host_uids == {sandbox._uid}


async def test_a_workdir_on_the_read_only_root_is_refused(local_factory: LocalFactory) -> None:
    with pytest.raises(SandboxStartError, match="docker backend"):
        await local_factory.create(SandboxSpec(name="bad-workdir", workdir="/usr/src/app"))


async def test_a_workdir_outside_the_host_dirs_becomes_private(local_factory: LocalFactory) -> None:
    async with await local_factory.create(SandboxSpec(name="ws", workdir="/workspace/x")) as box:
        result = await box.exec("pwd; touch file && ls")
        assert result.stdout == "/workspace/x\nfile\n"


async def test_close_removes_processes_and_files(local_factory: LocalFactory) -> None:
    sandbox = await local_factory.create(SandboxSpec(name="closing"))
    try:
        await sandbox.exec("sleep 300 &")
        home, namespace = sandbox._layout.home, sandbox._channel.namespace
        assert home.is_dir() and len(_living(namespace)) >= 2  # pid 1 and the background sleep
    finally:
        await sandbox.close()
    assert not home.exists()
    assert _living(namespace) == []


async def test_unreachable_root_is_a_clear_error(tmp_path: Path, bwrap: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs bubblewrap under a separate uid")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(SandboxStartError, match="not reachable"):
        await LocalSandbox.create(SandboxSpec(name="x"), root=private / "sandboxes")


async def test_a_busy_loop_dies_at_its_cpu_time_limit(local_factory: LocalFactory) -> None:
    spec = SandboxSpec(name="spin", cpu_time_s=1)
    async with await local_factory.create(spec) as sandbox:
        spin = await sandbox.exec("ulimit -t; while :; do :; done", timeout=120)
        assert spin.stdout == "1\n" and not spin.timed_out, spin
        # killed by the kernel: SIGXCPU at the soft limit or SIGKILL at the hard one
        assert spin.exit_code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL), spin
        # the limit is per process: the sandbox itself lives on
        assert (await sandbox.exec("echo alive")).stdout == "alive\n"


async def test_sandboxes_start_under_a_restrictive_umask(tmp_path: Path) -> None:
    """Root with umask 077: the folders the sandbox's own uid enters must not come out 0700."""
    root = Path("/tmp") / f"apprentice-umask-{os.getpid()}-{tmp_path.name}"
    previous = os.umask(0o077)
    try:
        factory = LocalFactory(root=root)
        async with await factory.create(SandboxSpec(name="umask")) as sandbox:
            os.umask(previous)
            result = await sandbox.exec("echo hi > out.txt && cat out.txt && pwd")
            assert result.stdout == "hi\n/app\n", result
    finally:
        os.umask(previous)
        shutil.rmtree(root, ignore_errors=True)
