"""Task Dockerfiles: what the local backend honours (the same result as a docker build), what
it refuses (with a pointer to the docker backend, never half-built), and the docker backend's
build cache."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import anyio
import pytest

from sandboxes import dockerfile
from sandboxes.errors import SandboxBuildError, UnsupportedDockerfileError
from sandboxes.local import LocalFactory
from sandboxes.types import SandboxSpec

pytestmark = pytest.mark.anyio

SUPPORTED = """\
# syntax=docker/dockerfile:1
ARG BASE=debian:bookworm-slim
FROM $BASE AS only-stage
ARG GREETING=hello
LABEL org.example.purpose="test"
ENV APP_HOME=/srv/app \\
    MODE="fast mode"
# comments inside a continuation are dropped
WORKDIR $APP_HOME
COPY data/ ./data/
COPY notes.txt ${APP_HOME}/docs/
COPY run.sh bin/run.sh
ADD bundle.tar.gz unpacked/
RUN echo "$GREETING from $MODE" > built.txt \\
 && mkdir -p /tmp/cache
RUN ["bash", "-c", "echo exec-form > exec.txt"]
EXPOSE 8080
CMD ["bash"]
"""


def write_environment(root: Path, text: str = SUPPORTED) -> Path:
    environment = root / "environment"
    (environment / "data" / "nested").mkdir(parents=True)
    (environment / "Dockerfile").write_text(text)
    (environment / "data" / "a.txt").write_text("A\n")
    (environment / "data" / "nested" / "b.bin").write_bytes(bytes(range(256)))
    (environment / "notes.txt").write_text("notes\n")
    (environment / "run.sh").write_text("#!/bin/sh\necho running\n")
    (environment / "run.sh").chmod(0o755)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("inside/packed.txt")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"packed\n"))
    (environment / "bundle.tar.gz").write_bytes(archive.getvalue())
    return environment


CHECK = (
    'pwd; echo "$MODE"; echo "[${GREETING-unset}]"; cat built.txt exec.txt data/a.txt '
    "docs/notes.txt unpacked/inside/packed.txt; bin/run.sh; wc -c < data/nested/b.bin; "
    "test -d /tmp/cache && echo cache"
)
EXPECTED = (
    "/srv/app\nfast mode\n[unset]\nhello from fast mode\nexec-form\nA\nnotes\npacked\n"
    "running\n256\ncache\n"
)


async def test_local_realises_a_dockerfile_like_docker_does(factory, tmp_path: Path) -> None:
    environment = write_environment(tmp_path)
    spec = SandboxSpec(name="dockerfile", environment_dir=environment, workdir="/srv/app")
    async with await factory.create(spec) as sandbox:
        result = await sandbox.exec(CHECK)
        assert result.stdout == EXPECTED, result


@pytest.mark.bwrap
async def test_copy_chmod_and_apt_steps_the_host_already_satisfies(
    local_factory: LocalFactory, tmp_path: Path
) -> None:
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    (environment / "Dockerfile").write_text(
        "FROM debian:bookworm-slim\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends bash coreutils \\\n"
        "    && rm -rf /var/lib/apt/lists/*\n"
        "WORKDIR /app\n"
        "COPY --chmod=750 tool.sh /app/tool.sh\n"
    )
    spec = SandboxSpec(name="chmod", environment_dir=environment)
    async with await local_factory.create(spec) as sandbox:
        result = await sandbox.exec("stat -c %a tool.sh && ./tool.sh")
        assert result.stdout == "750\ntool\n"


REFUSED = {
    "multi-stage": ("FROM a AS build\nRUN true\nFROM b\n", "multi-stage"),
    "copy-from": ("FROM a\nCOPY --from=build /x /app/x\n", "COPY --from"),
    "unknown": ("FROM a\nFROBNICATE now\n", "unknown instruction FROBNICATE"),
    "user": ("FROM a\nUSER nobody\n", "USER nobody"),
    "shell": ('FROM a\nSHELL ["/bin/sh", "-c"]\n', "SHELL"),
    "read-only-copy": ("FROM a\nCOPY notes.txt /etc/notes.txt\n", "read-only root"),
    "url": ("FROM a\nADD https://example.com/x.tgz /app/\n", "URL"),
    "heredoc": ("FROM a\nRUN <<EOF\necho hi\nEOF\n", "heredoc"),
    "missing-source": ("FROM a\nCOPY nothere.txt /app/\n", "does not exist"),
    "escape": ("FROM a\nCOPY ../../etc/passwd /app/\n", "outside the environment folder"),
    "missing-package": (
        "FROM a\nRUN apt-get update && apt-get install -y definitely-not-a-package-xyz\n",
        "failed with exit code",
    ),
    "write-outside": ("FROM a\nRUN echo x > /usr/local/bin/tool\n", "Read-only file system"),
}


@pytest.mark.bwrap
@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_refused_dockerfiles_point_to_docker_and_leave_nothing(
    local_factory: LocalFactory, tmp_path: Path, case: str
) -> None:
    text, reason = REFUSED[case]
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "Dockerfile").write_text(text)
    (environment / "notes.txt").write_text("notes\n")
    before = set(local_factory.root.iterdir()) if local_factory.root.exists() else set()
    with pytest.raises(UnsupportedDockerfileError) as caught:
        await local_factory.create(SandboxSpec(name=f"refused-{case}", environment_dir=environment))
    message = str(caught.value)
    assert reason in message
    assert "backend=docker" in message and str(environment / "Dockerfile") in message
    assert set(local_factory.root.iterdir()) == before  # never half-built


def test_reader_joins_continuations_and_skips_comments(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("FROM x\n\nRUN a \\\n  # note\n  && b\nenv K V with spaces\n")
    instructions = dockerfile.read_instructions(path)
    assert [(i.line, i.keyword, i.args) for i in instructions] == [
        (1, "FROM", "x"),
        (3, "RUN", "a && b"),
        (6, "ENV", "K V with spaces"),
    ]
    steps = dockerfile.parse(path, tmp_path)
    assert steps[-1] == dockerfile.Env(6, {"K": "V with spaces"})


def test_substitution_follows_docker(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text(
        "FROM x\nARG ROOT=/opt/x\nENV A=1 B=${MISSING:-fallback} C=${A:+set} D=\\$literal\n"
        "ENV E=${A:+set}\n"
        "WORKDIR ${ROOT}/w\nWORKDIR sub\n"
    )
    steps = dockerfile.parse(path, tmp_path)
    # like docker: a variable set in the same ENV is not yet visible (C), in the next one it is
    assert steps[0] == dockerfile.Env(3, {"A": "1", "B": "fallback", "C": "", "D": "$literal"})
    assert steps[1] == dockerfile.Env(4, {"E": "set"})
    assert [s.path for s in steps if isinstance(s, dockerfile.Workdir)] == [
        "/opt/x/w",
        "/opt/x/w/sub",
    ]


@pytest.mark.docker
async def test_docker_builds_one_image_for_concurrent_creates(
    docker_factory, tmp_path: Path
) -> None:
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "Dockerfile").write_text(
        f"FROM debian:bookworm-slim\nRUN echo {tmp_path.name} > /built\nWORKDIR /app\n"
    )
    spec = SandboxSpec(name="cache", environment_dir=environment)
    sandboxes = []

    async def create() -> None:
        sandboxes.append(await docker_factory.create(spec))

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(create)
    try:
        assert docker_factory.builds == 1
        assert len({s.image for s in sandboxes}) == 1
        assert sandboxes[0].image.startswith("apprentice-env:")
        result = await sandboxes[0].exec("cat /built")
        assert result.stdout == f"{tmp_path.name}\n"
        again = await docker_factory.create(spec)
        await again.close()
        assert docker_factory.builds == 1
    finally:
        for sandbox in sandboxes:
            await sandbox.close()
        docker_factory.api.remove_image(sandboxes[0].image, force=True)


@pytest.mark.docker
async def test_docker_build_failure_shows_the_build_log(docker_factory, tmp_path: Path) -> None:
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "Dockerfile").write_text(
        "FROM debian:bookworm-slim\nRUN echo about-to-fail && exit 3\n"
    )
    with pytest.raises(SandboxBuildError) as caught:
        await docker_factory.create(SandboxSpec(name="broken", environment_dir=environment))
    message = str(caught.value)
    assert "broken" in message and "non-zero code: 3" in message and "about-to-fail" in message


@pytest.mark.docker
async def test_a_docker_build_past_its_timeout_is_a_build_error_and_not_built_twice(
    docker_factory, tmp_path: Path
) -> None:
    environment = tmp_path / "environment"
    environment.mkdir()
    (environment / "Dockerfile").write_text(
        f"FROM debian:bookworm-slim\nRUN sleep 6 && echo {tmp_path.name} > /built\n"
    )
    spec = SandboxSpec(name="slow-build", environment_dir=environment, build_timeout_s=1)
    builds = docker_factory.builds
    for _ in range(2):  # the second fails at once: the first build may still be running
        with pytest.raises(SandboxBuildError, match=r"took longer than build_timeout_s=1 \("):
            await docker_factory.create(spec)
    assert docker_factory.builds == builds
    # the abandoned build finishes on its own; then its image serves the next create
    tag = next(iter(docker_factory._timed_out))
    for _ in range(120):
        if docker_factory._has_image(tag):
            break
        await anyio.sleep(0.5)
    try:
        async with await docker_factory.create(spec) as sandbox:
            assert (await sandbox.exec("cat /built")).stdout == f"{tmp_path.name}\n"
    finally:
        docker_factory.api.remove_image(tag, force=True)
