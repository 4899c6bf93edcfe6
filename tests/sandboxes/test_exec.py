"""Exec semantics every backend shares: exit codes, stderr, timeouts that kill whole process
trees, capped output, binary-safe file transfer, and the persistent shell state."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio
import pytest

from sandboxes.errors import SandboxDeadError, SandboxFileError
from sandboxes.types import ExecResult, Sandbox, SandboxSpec

pytestmark = pytest.mark.anyio


async def _gone(sandbox: Sandbox, pid_file: str) -> ExecResult:
    """Exit 0 when the process whose pid is in ``pid_file`` no longer exists (or is a zombie
    about to be reaped) inside the sandbox; waits up to 3 s for the kill to land."""
    return await sandbox.exec(
        f"pid=$(cat {pid_file}); for i in $(seq 30); do "
        "[ -e /proc/$pid ] || exit 0; read -r l < /proc/$pid/stat || exit 0; "
        's=${l##*) }; [ "${s%% *}" = Z ] && exit 0; sleep 0.1; done; exit 1'
    )


async def test_exit_code_stdout_stderr(sandbox: Sandbox) -> None:
    result = await sandbox.exec("echo out; echo err >&2; exit 7")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 7)
    assert not result.ok and not result.timed_out and result.duration_s > 0
    assert (await sandbox.exec("true")).ok


async def test_syntax_error_is_a_failed_command_not_an_exception(sandbox: Sandbox) -> None:
    result = await sandbox.exec("if then fi (")
    assert result.exit_code == 2 and "syntax error" in result.stderr
    assert (await sandbox.exec("echo still fine")).stdout == "still fine\n"


async def test_timeout_kills_children_and_grandchildren(sandbox: Sandbox) -> None:
    command = (
        "sh -c 'sleep 300 & echo $! > /tmp/grandchild.pid; wait' & "
        "setsid sleep 300 & echo $! > /tmp/detached.pid; "
        "sleep 300"
    )
    result = await sandbox.exec(command, timeout=1.5)
    assert result.timed_out and result.exit_code is None
    assert 1.4 < result.duration_s < 10
    assert (await _gone(sandbox, "/tmp/grandchild.pid")).ok
    assert (await _gone(sandbox, "/tmp/detached.pid")).ok  # setsid does not escape
    assert (await sandbox.exec("echo alive")).stdout == "alive\n"


async def test_background_job_holding_stdout_does_not_hang_the_call(sandbox: Sandbox) -> None:
    with anyio.fail_after(10):
        result = await sandbox.exec("sleep 30 & echo started")
    assert result.ok and result.stdout == "started\n"


async def test_huge_output_is_capped(sandbox: Sandbox) -> None:
    cap = sandbox.spec.max_output_bytes
    result = await sandbox.exec("head -c 50000000 /dev/zero | tr '\\0' a; echo; echo END")
    assert result.ok and result.truncated
    assert len(result.stdout) < cap + 200
    assert result.stdout.startswith("aaaa") and result.stdout.endswith("END\n")
    assert "bytes of output omitted" in result.stdout


async def test_binary_file_round_trip(sandbox: Sandbox, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4096 + b"\x00\xff\x00"
    source = tmp_path / "blob.bin"
    source.write_bytes(payload)
    await sandbox.upload_file(source, "/tmp/deep/er/blob.bin")
    result = await sandbox.exec("wc -c < /tmp/deep/er/blob.bin")
    assert result.stdout.strip() == str(len(payload))
    back = tmp_path / "back" / "blob.bin"
    await sandbox.download_file("/tmp/deep/er/blob.bin", back)
    assert back.read_bytes() == payload


async def test_directory_round_trip_keeps_content_and_modes(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty.txt").write_bytes(b"")
    (tree / "sub" / "data.bin").write_bytes(os.urandom(100_000))
    (tree / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "sub" / "deeper" / "run.sh").chmod(0o755)
    await sandbox.upload_dir(tree, "/app/tree")
    assert (await sandbox.exec("/app/tree/sub/deeper/run.sh")).stdout == "ran\n"
    back = tmp_path / "back"
    await sandbox.download_dir("/app/tree", back)
    for path in tree.rglob("*"):
        twin = back / path.relative_to(tree)
        assert twin.exists(), twin
        if path.is_file():
            assert twin.read_bytes() == path.read_bytes()
            assert stat.S_IMODE(twin.stat().st_mode) == stat.S_IMODE(path.stat().st_mode)


async def test_missing_remote_path_raises_a_file_error(sandbox: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(SandboxFileError, match="/nope/missing"):
        await sandbox.download_file("/nope/missing", tmp_path / "x")
    with pytest.raises(SandboxFileError, match="/nope/dir"):
        await sandbox.download_dir("/nope/dir", tmp_path / "y")


async def test_cwd_and_exports_persist(sandbox: Sandbox) -> None:
    await sandbox.exec("mkdir -p /tmp/work && cd /tmp/work && export GREETING='hi there'")
    result = await sandbox.exec('pwd; echo "$GREETING"')
    assert result.stdout == "/tmp/work\nhi there\n"
    await sandbox.exec("unset GREETING; cd /; exit 3")
    result = await sandbox.exec('pwd; echo "[${GREETING-unset}]"')
    assert result.stdout == "/\n[unset]\n"


async def test_explicit_cwd_and_env_apply_to_one_call(sandbox: Sandbox) -> None:
    await sandbox.exec("cd /tmp && export KEEP=1")
    result = await sandbox.exec("pwd; echo $ONCE $KEEP", cwd="/", env={"ONCE": "x", "KEEP": "2"})
    assert result.stdout == "/\nx 2\n"
    result = await sandbox.exec('pwd; echo "[${ONCE-unset}] $KEEP"')
    assert result.stdout == "/tmp\n[unset] 1\n"


async def test_state_survives_a_timed_out_command(sandbox: Sandbox) -> None:
    await sandbox.exec("cd /tmp && export A=1")
    result = await sandbox.exec("cd / && export A=2 && sleep 100", timeout=0.5)
    assert result.timed_out
    assert (await sandbox.exec("pwd; echo $A")).stdout == "/tmp\n1\n"


async def test_concurrent_commands_in_one_sandbox(sandbox: Sandbox) -> None:
    results: list[ExecResult] = []

    async def run(i: int) -> None:
        results.append(await sandbox.exec(f"sleep 0.2; echo {i}", cwd="/"))

    async with anyio.create_task_group() as group:
        for i in range(8):
            group.start_soon(run, i)
    assert sorted(int(r.stdout) for r in results) == list(range(8))


async def test_cancelled_call_kills_its_command(sandbox: Sandbox) -> None:
    with anyio.move_on_after(0.5):
        await sandbox.exec("sleep 300 & echo $! > /tmp/cancelled.pid; wait")
    assert (await _gone(sandbox, "/tmp/cancelled.pid")).ok


async def test_closed_sandbox_raises_and_close_is_idempotent(factory, tmp_path: Path) -> None:
    sandbox = await factory.create(SandboxSpec(name="closing"))
    async with sandbox:
        assert (await sandbox.exec("echo hi")).ok
    await sandbox.close()
    with pytest.raises(SandboxDeadError, match="closing"):
        await sandbox.exec("echo hi")


async def test_no_network_by_default_only_loopback(sandbox: Sandbox) -> None:
    result = await sandbox.exec("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert result.stdout.split() == ["lo"]
    result = await sandbox.exec("timeout 5 bash -c 'echo > /dev/tcp/192.0.2.1/80'")
    assert result.exit_code != 0


async def test_network_when_the_spec_allows_it(factory) -> None:
    async with await factory.create(SandboxSpec(name="online", network=True)) as sandbox:
        result = await sandbox.exec("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert set(result.stdout.split()) - {"lo"}


async def test_process_storm_is_stopped_by_the_pids_limit(factory) -> None:
    spec = SandboxSpec(name="storm", pids_limit=40)
    async with await factory.create(spec) as sandbox:
        storm = (
            "perl -e 'my @kids; for (1..500) { my $p = fork(); last unless defined $p; "
            "if ($p == 0) { sleep 20; exit 0 } push @kids, $p } "
            "print scalar(@kids), qq(\\n); kill 9, @kids; waitpid($_, 0) for @kids'"
        )
        result = await sandbox.exec(storm, timeout=60)
        assert result.ok, result
        assert 5 < int(result.stdout) < 40
        # the classic bomb, kept in the foreground so the timeout has to kill the whole swarm
        bomb = await sandbox.exec(":(){ :|:& }; :; sleep 10", timeout=3)
        assert bomb.timed_out
        with anyio.fail_after(30):
            assert (await sandbox.exec("echo recovered", timeout=20)).stdout == "recovered\n"


async def test_memory_hog_is_killed_not_the_host(factory) -> None:
    async with await factory.create(SandboxSpec(name="hog", memory_mb=128)) as sandbox:
        hog = "perl -e '$x = q(a) x (1024 * 1024 * 1024); print length($x), qq(\\n)'"
        result = await sandbox.exec(hog, timeout=60)
        assert result.exit_code not in (0, None), result
        assert "1073741824" not in result.stdout
        small = await sandbox.exec("perl -e '$x = q(a) x (16 * 1024 * 1024); print length($x)'")
        assert small.stdout == str(16 * 1024 * 1024)
