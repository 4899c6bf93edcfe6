"""Harbor's own Trial (its oracle and no-op agents and its verifier), running on our docker
backend as a Harbor environment, gives the same rewards as our check."""

from __future__ import annotations

import pytest
from harbor.models.trial.config import AgentConfig, EnvironmentConfig, TaskConfig, TrialConfig
from harbor.trial.trial import Trial

from envs.harbor.check import CheckAgent, check_task
from envs.harbor.tasks import load_tasks
from sandboxes.factory import make_factory
from sandboxes.testing import require_docker

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

TASKS = ["count-lines", "extract-archive", "set-config-port", "greet-script", "top-scorer"]


async def harbor_trial_rewards(task, agent: str, trials_dir) -> dict[str, float] | None:
    config = TrialConfig(
        task=TaskConfig(path=task.path),
        trials_dir=trials_dir,
        trial_name=f"{task.name}-{agent}",
        agent=AgentConfig(name=agent),
        environment=EnvironmentConfig(import_path="sandboxes.harbor:ApprenticeDockerEnvironment"),
    )
    result = await (await Trial.create(config)).run()
    assert result.exception_info is None, result.exception_info
    return result.verifier_result.rewards if result.verifier_result else None


@pytest.mark.parametrize("agent", ["oracle", "nop"])
async def test_harbor_trial_agrees_with_our_check(agent, tmp_path):
    require_docker()
    factory = make_factory("docker")
    tasks = {t.name: t for t in load_tasks("bundled")}
    for name in TASKS:
        ours = await check_task(tasks[name], factory, CheckAgent(agent))
        theirs = await harbor_trial_rewards(tasks[name], agent, tmp_path)
        assert ours.error is None, ours.error
        assert ours.rewards == theirs, name
        assert ours.reward == (1.0 if agent == "oracle" else 0.0)
