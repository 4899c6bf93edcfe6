"""Harbor both ways: Harbor's own Trial (oracle agent + verifier) running on our backends, and
Harbor environment classes driven as Apprentice sandboxes; plus the task.toml mapping."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
from harbor.models.task.config import TaskConfig
from harbor.models.trial.config import AgentConfig, EnvironmentConfig, TrialConfig
from harbor.models.trial.config import TaskConfig as TrialTaskConfig
from harbor.trial.trial import Trial

from sandboxes.errors import SandboxDeadError, SandboxError, SandboxFileError
from sandboxes.factory import check_backend_name, make_factory, spec_from_harbor_config
from sandboxes.harbor import ApprenticeLocalEnvironment, HarborFactory, HarborSandbox
from sandboxes.types import SandboxSpec

from .conftest import FIXTURES

pytestmark = pytest.mark.anyio

TASK = FIXTURES / "hello-harbor"


async def run_oracle_trial(environment: str, trials_dir: Path):
    config = TrialConfig(
        task=TrialTaskConfig(path=TASK.resolve()),
        trials_dir=trials_dir,
        agent=AgentConfig(name="oracle"),
        environment=EnvironmentConfig(import_path=f"sandboxes.harbor:{environment}"),
    )
    trial = await Trial.create(config)
    return await trial.run()


@pytest.mark.docker
async def test_harbor_trial_with_oracle_runs_on_our_docker_backend(
    docker: None, tmp_path: Path
) -> None:
    result = await run_oracle_trial("ApprenticeDockerEnvironment", tmp_path)
    assert result.exception_info is None, result.exception_info
    assert result.verifier_result is not None
    assert result.verifier_result.rewards == {"reward": 1.0}
    trial_dir = next(tmp_path.iterdir())
    assert (trial_dir / "agent" / "oracle.txt").read_text() == "counted 3 lines\n"
    assert (trial_dir / "verifier" / "reward.txt").read_text().strip() == "1"


@pytest.mark.bwrap
async def test_harbor_trial_with_oracle_runs_on_our_local_backend(
    bwrap: None, tmp_path: Path
) -> None:
    result = await run_oracle_trial("ApprenticeLocalEnvironment", tmp_path)
    assert result.exception_info is None, result.exception_info
    assert result.verifier_result.rewards == {"reward": 1.0}


@pytest.mark.bwrap
async def test_a_harbor_environment_class_as_an_apprentice_sandbox(
    bwrap: None, tmp_path: Path
) -> None:
    # any BaseEnvironment subclass works; ours is the one that runs here without credentials
    factory = make_factory("sandboxes.harbor:ApprenticeLocalEnvironment")
    spec = SandboxSpec(name="via-harbor", environment_dir=TASK / "environment")
    async with await factory.create(spec) as sandbox:
        assert isinstance(sandbox, HarborSandbox)
        assert (await sandbox.exec("cat words.txt | wc -l")).stdout == "3\n"
        await sandbox.exec("cd /tmp && export X=1")
        assert (await sandbox.exec("pwd; echo $X")).stdout == "/tmp\n1\n"
        result = await sandbox.exec(
            "sh -c 'sleep 300 & echo $! > /tmp/gc.pid; wait' & sleep 300", timeout=1
        )
        assert result.timed_out
        gone = await sandbox.exec("sleep 0.5; kill -0 $(cat /tmp/gc.pid) 2>/dev/null || echo gone")
        assert gone.stdout == "gone\n"
        (tmp_path / "in.bin").write_bytes(bytes(range(256)))
        await sandbox.upload_file(tmp_path / "in.bin", "/tmp/in.bin")
        await sandbox.download_file("/tmp/in.bin", tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == bytes(range(256))


class LosesItsConnection(ApprenticeLocalEnvironment):
    """A provider whose API drops the connection once started (a cloud hiccup)."""

    broken = False

    async def exec(self, command, cwd=None, env=None, timeout_sec=None, user=None):
        if self.broken:
            raise ConnectionError("provider API: connection reset by peer")
        return await super().exec(command, cwd, env, timeout_sec, user)

    async def upload_file(self, source_path, target_path):
        if self.broken:
            raise ConnectionError("provider API: connection reset by peer")
        return await super().upload_file(source_path, target_path)


@pytest.mark.bwrap
async def test_a_providers_own_errors_are_sandbox_errors(bwrap: None, tmp_path: Path) -> None:
    """Not a tool error the model would read (and be trained on): the episode is invalid."""
    factory = HarborFactory(LosesItsConnection)
    spec = SandboxSpec(name="flaky", environment_dir=TASK / "environment")
    async with await factory.create(spec) as sandbox:
        assert (await sandbox.exec("echo hi")).stdout == "hi\n"
        sandbox.environment.broken = True
        with pytest.raises(SandboxDeadError, match="could not run a command: ConnectionError"):
            await sandbox.exec("echo hi")
        (tmp_path / "a.txt").write_text("a")
        with pytest.raises(SandboxFileError, match=r"could not upload .*a\.txt to /tmp/a\.txt"):
            await sandbox.upload_file(tmp_path / "a.txt", "/tmp/a.txt")
        sandbox.environment.broken = False


def test_unknown_harbor_type_fails_when_the_factory_is_made_listing_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown Harbor environment type 'nonsense'.*daytona"):
        make_factory("harbor:nonsense")
    with pytest.raises(ValueError, match="daytona"):
        check_backend_name("harbor:nonsense")  # what configs call: nothing is constructed


def test_check_backend_name_accepts_what_make_factory_understands() -> None:
    for backend in ("local", "docker", "harbor:daytona", "sandboxes.harbor:HarborFactory"):
        assert check_backend_name(backend) == backend
    with pytest.raises(ValueError, match="local, docker, harbor:<type>, module:attr"):
        check_backend_name("cloud")
    with pytest.raises(ValueError, match="cannot import"):
        check_backend_name("no.such.module:Thing")


def test_make_factory_rejects_unknown_backends() -> None:
    with pytest.raises(ValueError, match="local, docker, harbor:<type>, module:attr"):
        make_factory("kubernetes")
    with pytest.raises(ValueError, match="cannot import"):
        make_factory("no.such.module:Thing")
    with pytest.raises(ValueError, match="neither a SandboxFactory"):
        make_factory("os.path:sep")


def config(text: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return TaskConfig.model_validate(tomllib.loads(text)).environment


def test_spec_from_task_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPRENTICE_TEST_TOKEN", "s3cret")
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "Dockerfile").write_text("FROM x\nWORKDIR /srv\nWORKDIR code\n")
    spec = spec_from_harbor_config(
        "demo",
        environment,
        config(
            "[environment]\ncpus = 2\nmemory_mb = 1024\nstorage_mb = 4096\n"
            'build_timeout_sec = 90.0\nnetwork_mode = "no-network"\n'
            '[environment.env]\nTOKEN = "${APPRENTICE_TEST_TOKEN}"\nMODE = "${UNSET_X:-dflt}"\n'
        ),
    )
    assert (spec.name, spec.environment_dir, spec.workdir) == ("demo", environment, "/srv/code")
    assert (spec.cpus, spec.memory_mb, spec.storage_mb) == (2, 1024, 4096)
    assert spec.build_timeout_s == 90.0 and spec.network is False
    assert spec.env == {"TOKEN": "s3cret", "MODE": "dflt"}


@pytest.mark.parametrize(
    ("toml", "network"),
    [
        ("[environment]\n", False),  # Harbor defaults to public; we default to none
        ('[environment]\nnetwork_mode = "public"\n', True),
        ("[environment]\nallow_internet = true\n", True),
        ("[environment]\nallow_internet = false\n", False),
    ],
)
def test_network_only_when_the_task_asks(toml: str, network: bool) -> None:
    assert spec_from_harbor_config("t", None, config(toml)).network is network


def test_workdir_and_image_settings(tmp_path: Path) -> None:
    spec = spec_from_harbor_config(
        "t", tmp_path, config('[environment]\ndocker_image = "img:1"\nworkdir = "/w"\n')
    )
    assert (spec.docker_image, spec.workdir) == ("img:1", "/w")
    assert spec_from_harbor_config("t", tmp_path, None).workdir == "/app"


@pytest.mark.parametrize(
    ("dockerfile", "workdir"),
    [
        ("FROM debian:bookworm-slim\nWORKDIR /srv\nWORKDIR app\n", "/srv/app"),
        ("FROM debian:bookworm-slim\nENV APP=/srv/app\nWORKDIR $APP\n", "/srv/app"),
        ("FROM debian:bookworm-slim\nARG BASE=/opt\nWORKDIR ${BASE}/x\n", "/opt/x"),
        # multi-stage (docker backend only): the last stage's WORKDIR
        ("FROM a AS b\nWORKDIR /one\nFROM debian:bookworm-slim\nWORKDIR /two\n", "/two"),
        ("FROM debian:bookworm-slim\n", "/app"),
    ],
)
def test_the_workdir_is_the_dockerfiles_last(tmp_path: Path, dockerfile: str, workdir: str) -> None:
    (tmp_path / "Dockerfile").write_text(dockerfile)
    assert spec_from_harbor_config("t", tmp_path, None).workdir == workdir


def test_settings_no_backend_can_honour_are_refused() -> None:
    with pytest.raises(SandboxError, match="allowlist"):
        spec_from_harbor_config(
            "t",
            None,
            config('[environment]\nnetwork_mode = "allowlist"\nallowed_hosts = ["pypi.org"]\n'),
        )
    with pytest.raises(SandboxError, match="GPU"):
        spec_from_harbor_config("t", None, config("[environment]\ngpus = 1\n"))
