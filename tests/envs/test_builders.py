"""Builders: the envs they make, batching, and that sandboxes never outlive their episodes
(success, failures, cancellation, retry), with real bubblewrap sandboxes."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from envs.harbor.builders import (
    HarborDataset,
    HarborDatasetBuilder,
    HarborDistillationDatasetBuilder,
    HarborEnvConfig,
    HarborEnvGroupBuilder,
    RewardMode,
)
from envs.harbor.tasks import load_task
from sandboxes.errors import SandboxStartError
from sandboxes.factory import make_factory
from sandboxes.testing import require_bwrap, require_docker
from sandboxes.types import Sandbox, SandboxSpec
from tool_use.agent_env import AgentToolMessageEnv
from tool_use.errors import EnvironmentFailure
from tool_use.types import Message, ParsedResponse, StopReason, ToolCall

pytestmark = pytest.mark.anyio


@dataclass
class CountingFactory:
    """The real local factory, counting what it created and what got closed; ``fail_on`` makes
    the n-th ``create`` call (1-based) raise, as a broken backend would."""

    root: Path
    fail_on: set[int] = field(default_factory=set)
    calls: int = 0
    created: list[Sandbox] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.inner = make_factory("local", root=self.root)

    async def create(self, spec: SandboxSpec) -> Sandbox:
        self.calls += 1
        if self.calls in self.fail_on:
            raise SandboxStartError(f"injected failure of create call {self.calls}")
        sandbox = await self.inner.create(spec)
        self.created.append(sandbox)
        return sandbox

    def leftovers(self) -> list[str]:
        """Sandbox homes still on disk and processes still running under our root."""
        homes = [p.name for p in self.root.iterdir()] if self.root.exists() else []
        procs = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    cmdline = Path(entry.path, "cmdline").read_bytes()
                except OSError:
                    continue
                if str(self.root).encode() in cmdline:
                    procs.append(entry.name)
        return homes + procs


@pytest.fixture
def counting():
    require_bwrap()
    # The sandbox's unprivileged uid must reach its root: pytest's tmp_path is private.
    root = Path(tempfile.mkdtemp(prefix="apprentice-test-sandboxes-"))
    root.chmod(0o755)
    yield CountingFactory(root)
    shutil.rmtree(root, ignore_errors=True)


def builder(task_dir, factory, reward_mode=RewardMode.VERIFIER, **config) -> HarborEnvGroupBuilder:
    config.setdefault("group_size", 2)
    return HarborEnvGroupBuilder(
        load_task(task_dir), factory, HarborEnvConfig(**config), reward_mode
    )


def bash_call(command: str, call_id: str = "c1") -> ParsedResponse:
    args = f'{{"command": {command!r}}}'.replace("'", '"')
    return ParsedResponse(
        Message(role="assistant", tool_calls=[ToolCall(id=call_id, name="bash", arguments=args)])
    )


DONE = ParsedResponse(Message(role="assistant", content="Done."))

COUNT_TASK = dict(
    instruction="Write the number of lines of /app/data.txt to /app/count.txt.\n",
    dockerfile="FROM debian:bookworm-slim\nWORKDIR /app\nCOPY data.txt /app/data.txt\n",
    files={"environment/data.txt": "a\nb\nc\n"},
    test_sh=(
        "#!/bin/bash\n"
        'if [ "$(tr -d "[:space:]" < /app/count.txt 2>/dev/null)" = 3 ]; then echo 1; '
        "else echo 0; fi > /logs/verifier/reward.txt\n"
    ),
    solve_sh="#!/bin/bash\nwc -l < /app/data.txt > /app/count.txt\n",
)


async def test_group_envs_run_real_episodes_graded_by_test_sh(counting, make_task):
    group = builder(make_task("count", **COUNT_TASK), counting, max_turns=4)
    envs = await group.make_envs()
    assert len(envs) == 2 and len(counting.created) == 2
    assert all(isinstance(env, AgentToolMessageEnv) for env in envs)
    solver, idler = envs
    try:
        first = await solver.initial_messages()
        assert [m.role for m in first] == ["system", "user"]
        assert first[1].content == COUNT_TASK["instruction"].strip()
        assert [spec["name"] for spec in solver.tools] == ["bash"]
        assert solver.metadata["task"] == "count" and solver.teacher_messages is None

        step = await solver.step(bash_call("cd /app && wc -l < data.txt > count.txt"))
        assert not step.done
        assert step.messages[0].content == "exit code: 0\n(no output)"
        step = await solver.step(bash_call("cat count.txt", "c2"))
        assert step.messages[0].content == "exit code: 0\nstdout:\n3"
        final = await solver.step(DONE)
        assert final.done and final.reward == 1.0 and final.stop_reason == StopReason.NO_TOOL_CALL
        assert final.metrics["bash/commands"] == 2.0

        idle = await idler.step(DONE)  # a separate sandbox: the solver's file is not there
        assert idle.done and idle.reward == 0.0 and idle.failure is None
    finally:
        for env in envs:
            await env.close()
    assert counting.leftovers() == []


async def test_grading_error_makes_the_episode_invalid_not_zero(counting, make_task):
    task = make_task("broken-tests", test_sh="#!/bin/bash\necho forgot the reward\n")
    (env,) = await builder(task, counting, group_size=1).make_envs()
    try:
        result = await env.step(DONE)
    finally:
        await env.close()
    assert result.done and result.stop_reason == StopReason.ENV_FAILURE
    assert result.failure.startswith("grading:")
    assert result.metrics["failure/grading"] == 1.0
    assert counting.leftovers() == []


async def test_distillation_reward_is_zero_and_teacher_sees_the_solution(counting, make_task):
    task = make_task("count", **COUNT_TASK)
    config = HarborEnvConfig(tasks=[str(task)], group_size=1, groups_per_batch=1)
    train, evaluation = HarborDistillationDatasetBuilder(config, counting)()
    assert evaluation is None and len(train) == 1
    (group,) = train.get_batch(0)
    assert group.reward_mode is RewardMode.ZERO
    (env,) = await group.make_envs()
    try:
        student = await env.initial_messages()
        assert "wc -l" not in student[1].content
        assert "wc -l < /app/data.txt > /app/count.txt" in env.teacher_messages[1].content
        assert env.teacher_messages[0] == student[0]
        await env.step(bash_call("wc -l < /app/data.txt > /app/count.txt"))
        final = await env.step(DONE)
        assert final.reward == 0.0 and final.failure is None  # solved, yet no reward signal
    finally:
        await env.close()


async def test_a_sandbox_that_fails_to_start_closes_the_rest_of_the_group(counting, make_task):
    group = builder(make_task(), counting, group_size=3, sandbox_retries=0)
    counting.fail_on = {2}
    with pytest.raises(EnvironmentFailure, match="injected failure") as info:
        await group.make_envs()
    assert info.value.kind == "sandbox" and "'demo'" in str(info.value)
    assert counting.leftovers() == []


async def test_a_failed_create_is_retried(counting, make_task):
    group = builder(make_task(), counting, group_size=2, sandbox_retries=1)
    counting.fail_on = {1}
    envs = await group.make_envs()
    assert len(envs) == 2 and counting.calls == 3
    for env in envs:
        await env.close()
    assert counting.leftovers() == []


async def test_cancelled_creation_leaves_nothing_behind(counting, make_task):
    slow = "FROM debian:bookworm-slim\nWORKDIR /app\nRUN sleep 2\n"
    group = builder(make_task(dockerfile=slow), counting, group_size=3)
    with anyio.move_on_after(1.0) as scope:
        await group.make_envs()
    assert scope.cancelled_caught
    assert counting.leftovers() == []


async def test_a_sandbox_dying_mid_episode_is_an_env_failure_and_is_cleaned_up(counting, make_task):
    (env,) = await builder(make_task(), counting, group_size=1).make_envs()
    try:
        await counting.created[0].close()  # the sandbox dies under the episode
        result = await env.step(bash_call("echo hi"))
    finally:
        await env.close()
    assert result.done and result.stop_reason == StopReason.ENV_FAILURE
    assert result.failure.startswith("sandbox:")
    assert counting.leftovers() == []


async def test_agent_time_budget_stops_the_episode(counting, make_task):
    toml = "[agent]\ntimeout_sec = 1.0\n"
    (env,) = await builder(make_task(task_toml=toml), counting, group_size=1).make_envs()
    try:
        slow = await env.step(bash_call("sleep 5; echo late"))
        assert "timed out after 1 s" in slow.messages[0].content and not slow.done
        stopped = await env.step(bash_call("echo again", "c2"))
    finally:
        await env.close()
    assert "time budget of 1 seconds" in stopped.messages[0].content
    assert stopped.done and stopped.stop_reason == StopReason.TOOL_STOP


# ---- datasets -----------------------------------------------------------------------------


def test_dataset_batches_epochs_and_seeded_shuffle(make_task):
    require_bwrap()
    factory = make_factory("local")
    tasks = [load_task(make_task(f"t{i}")) for i in range(5)]
    config = HarborEnvConfig(groups_per_batch=2)
    builders = [HarborEnvGroupBuilder(t, factory, config) for t in tasks]

    def order(dataset):
        return [[b.task.name for b in dataset.get_batch(i)] for i in range(len(dataset))]

    one = HarborDataset(builders, groups_per_batch=2, epochs=2, seed=7)
    assert len(one) == 5  # 10 groups in batches of 2
    batches = order(one)
    flat = [name for batch in batches for name in batch]
    assert sorted(flat[:5]) == sorted(flat[5:]) == [f"t{i}" for i in range(5)]
    assert batches == order(HarborDataset(builders, groups_per_batch=2, epochs=2, seed=7))
    assert batches != order(HarborDataset(builders, groups_per_batch=2, epochs=2, seed=8))
    plain = HarborDataset(builders, groups_per_batch=3, shuffle=False)
    assert order(plain) == [["t0", "t1", "t2"], ["t3", "t4"]]
    with pytest.raises(IndexError, match="out of range"):
        plain.get_batch(2)


def test_bundled_dataset_builder_uses_the_suite_split():
    require_bwrap()
    config = HarborEnvConfig(tasks=["bundled"], group_size=2, groups_per_batch=8, eval_group_size=1)
    train, evaluation = HarborDatasetBuilder(config)()
    train_names = {b.task.name for b in train.builders}
    eval_names = {b.task.name for b in evaluation.builders}
    assert len(train_names) >= 30 and len(eval_names) >= 8 and not train_names & eval_names
    assert all(b.reward_mode is RewardMode.VERIFIER for b in train.builders + evaluation.builders)
    assert len(train.get_batch(0)) == 8
    assert {b.group_size for b in evaluation.builders} == {1}


def test_dataset_builder_holds_out_by_pattern(make_task, tmp_path):
    require_bwrap()
    for name in ("a1", "a2", "b1"):
        make_task(name)
    config = HarborEnvConfig(tasks=[str(tmp_path / "tasks")], test=["b*"])
    train, evaluation = HarborDatasetBuilder(config)()
    assert sorted(b.task.name for b in train.builders) == ["a1", "a2"]
    assert [b.task.name for b in evaluation.builders] == ["b1"]


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not both"):
        HarborEnvConfig(test=["x"], test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown field"):
        HarborEnvConfig(teacher_template="{instruction} {nope}")
    with pytest.raises(ValueError, match="group_size"):
        HarborEnvConfig(group_size=0)


# ---- the same guarantees with docker containers ----------------------------------------------


@dataclass
class DockerCounting:
    """The real docker factory with injectable create failures; leftovers are this run's
    containers (found by the run label every container carries)."""

    fail_on: set[int] = field(default_factory=set)
    stall_on: set[int] = field(default_factory=set)
    calls: int = 0
    created: int = 0

    def __post_init__(self) -> None:
        self.inner = make_factory("docker")

    async def create(self, spec: SandboxSpec) -> Sandbox:
        self.calls += 1
        if self.calls in self.fail_on:
            raise SandboxStartError(f"injected failure of create call {self.calls}")
        if self.calls in self.stall_on:
            await anyio.sleep(60)  # a create that hangs until it is cancelled
        sandbox = await self.inner.create(spec)
        self.created += 1
        return sandbox

    def leftovers(self) -> list[str]:
        import docker

        client = docker.from_env()
        try:
            label = f"apprentice.run={self.inner.run_id}"
            return [c.name for c in client.containers.list(all=True, filters={"label": label})]
        finally:
            client.close()


@pytest.mark.docker
async def test_docker_containers_never_outlive_their_group(make_task):
    require_docker()
    factory = DockerCounting(fail_on={2})
    task = make_task("docker-cleanup")
    group = builder(task, factory, group_size=3, sandbox_retries=0)
    with pytest.raises(EnvironmentFailure, match="injected failure"):
        await group.make_envs()
    assert factory.leftovers() == []

    factory.fail_on = set()
    envs = await group.make_envs()
    assert len(factory.leftovers()) == 3
    for env in envs:
        await env.close()
    assert factory.leftovers() == []

    # Two containers are up when the third create hangs and the group is cancelled: the two
    # must be removed by make_envs itself.
    factory.calls, factory.created, factory.stall_on = 0, 0, {3}
    with anyio.move_on_after(10) as scope:
        await group.make_envs()
    assert scope.cancelled_caught and factory.created == 2
    assert factory.leftovers() == []
