"""Nothing leaks: a process killed with SIGKILL leaves sandboxes that the next factory start
reaps; SIGTERM cleans up on the way out; the session finalizer in conftest.py checks that no
container of this test run survives the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from sandboxes.local import LocalFactory
from sandboxes.procs import _alive
from sandboxes.types import SandboxSpec

pytestmark = pytest.mark.anyio

CHILD = """
import json, signal, sys, anyio
from sandboxes.types import SandboxSpec

# Ctrl-C as at a terminal, however pytest was started: a process started in the background by a
# non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main(backend, mode):
    if backend == "local":
        from sandboxes.local import LocalFactory
        sandbox = await LocalFactory().create(SandboxSpec(name="orphan"))
        info = {"home": str(sandbox._layout.home), "init_pid": sandbox._init_pid}
    elif backend == "harbor":
        from sandboxes.harbor import ApprenticeLocalEnvironment, HarborFactory

        spec = SandboxSpec(name="orphan", docker_image="debian:bookworm-slim")
        sandbox = await HarborFactory(ApprenticeLocalEnvironment).create(spec)
        info = {"trial": str(sandbox._trial_dir)}
    else:
        from sandboxes.docker import DockerFactory
        sandbox = await DockerFactory(exec_mode=mode).create(SandboxSpec(name="orphan"))
        info = {"container": sandbox.container_id}
    await sandbox.exec("sleep 300 &")
    print(json.dumps(info), flush=True)
    await anyio.sleep(300)

anyio.run(main, sys.argv[1], sys.argv[2])
"""


def spawn_owner(backend: str, mode: str = "auto") -> tuple[subprocess.Popen, dict]:
    """A separate Python process that creates one sandbox and then waits to be killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, backend, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    line = child.stdout.readline()
    if not line:
        child.kill()
        raise AssertionError(f"the child failed to create a sandbox: {child.stderr.read()}")
    return child, json.loads(line)


def kill(child: subprocess.Popen, signum: int) -> None:
    child.send_signal(signum)
    # A liveness bound, not a speed check: removing a container took over 30 s once while two
    # vLLM servers loaded this 2-core machine.
    child.wait(timeout=180)


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.bwrap
async def test_sigkilled_owner_local_sandbox_dies_and_is_reaped(bwrap: None) -> None:
    child, info = spawn_owner("local")
    kill(child, signal.SIGKILL)
    # the sandbox's pid 1 reads requests from its owner: end of input ends the sandbox
    assert wait_until(lambda: not _alive(info["init_pid"]))
    home = Path(info["home"])
    assert home.is_dir()  # its files stay until someone reaps them
    async with await LocalFactory().create(SandboxSpec(name="reaper")):
        assert not home.exists()


def _container_exists(api, container_id: str) -> bool:
    import docker

    try:
        api.inspect_container(container_id)
        return True
    except docker.errors.NotFound:
        return False


@pytest.mark.docker
@pytest.mark.parametrize("mode", ["api", "spawner"])
async def test_sigkilled_owner_docker_containers_are_reaped(docker_factory, mode: str) -> None:
    api = docker_factory.api
    child, info = spawn_owner("docker", mode)
    kill(child, signal.SIGKILL)
    if mode == "api":
        assert _container_exists(api, info["container"])  # nothing removed it...
    async with await docker_factory.create(SandboxSpec(name="reaper")):
        # ...the next factory start did (spawner containers may also have removed themselves)
        assert wait_until(lambda: not _container_exists(api, info["container"]))


@pytest.mark.docker
@pytest.mark.bwrap
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
async def test_sigterm_and_ctrl_c_clean_up_before_exiting(
    docker: None, bwrap: None, signum: int
) -> None:
    import docker as docker_sdk

    api = docker_sdk.from_env().api
    docker_child, docker_info = spawn_owner("docker", "api")
    local_child, local_info = spawn_owner("local")
    kill(docker_child, signum)
    kill(local_child, signum)
    assert docker_child.returncode != 0
    assert not _container_exists(api, docker_info["container"])
    assert not Path(local_info["home"]).exists()
    assert wait_until(lambda: not _alive(local_info["init_pid"]))


@pytest.mark.bwrap
async def test_sigterm_removes_a_harbor_environments_trial_folder(bwrap: None) -> None:
    child, info = spawn_owner("harbor")
    assert Path(info["trial"]).is_dir()
    kill(child, signal.SIGTERM)
    assert not Path(info["trial"]).exists()


@pytest.mark.docker
async def test_containers_carry_the_reaping_labels_and_the_spec_limits(docker_factory) -> None:
    spec = SandboxSpec(name="labelled", memory_mb=256, cpus=0.5, cpu_time_s=7)
    async with await docker_factory.create(spec) as box:
        info = docker_factory.api.inspect_container(box.container_id)
        labels = info["Config"]["Labels"]
        assert labels["apprentice.sandbox"] == "1"
        assert labels["apprentice.run"] == docker_factory.run_id
        assert labels["apprentice.owner"].split(":")[1] == str(os.getpid())
        assert labels["apprentice.task"] == "labelled"
        host = info["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["Memory"] == 256 * 1024 * 1024 and host["MemorySwap"] == host["Memory"]
        assert host["PidsLimit"] == 512
        assert host["NanoCpus"] == 500_000_000
        assert host["Ulimits"] == [{"Name": "cpu", "Soft": 7, "Hard": 7}]


@pytest.mark.docker
async def test_exception_inside_async_with_removes_the_container(docker_factory) -> None:
    container_id = None
    with pytest.raises(RuntimeError, match="boom"):
        async with await docker_factory.create(SandboxSpec(name="boom")) as sandbox:
            container_id = sandbox.container_id
            raise RuntimeError("boom")
    assert not _container_exists(docker_factory.api, container_id)


@pytest.mark.docker
async def test_cancellation_during_creation_leaves_nothing(docker_factory) -> None:
    api = docker_factory.api
    run = {"label": f"apprentice.run={docker_factory.run_id}"}
    for delay in (0.01, 0.1, 0.2, 0.3):
        with anyio.move_on_after(delay) as scope:
            sandbox = await docker_factory.create(SandboxSpec(name="cancelled"))
        if not scope.cancelled_caught:  # finished in time: not what this round tests
            await sandbox.close()
        assert api.containers(all=True, filters=run) == []
