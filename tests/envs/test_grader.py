"""Harbor's grading semantics in real sandboxes (bubblewrap): reward files, exit codes,
timeouts, binary fixtures, separate verifier environments, and agents trying to forge rewards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from envs.errors import GradingError
from envs.harbor.grader import GradeResult, HarborGrader
from envs.harbor.tasks import load_task
from sandboxes.factory import make_factory, spec_from_harbor_config
from sandboxes.shell import STATE_DIR
from sandboxes.testing import require_bwrap
from tool_use.errors import EnvironmentFailure

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def factory():
    require_bwrap()
    return make_factory("local")


async def grade(factory, task_dir, agent: Sequence[str] = (), **grader_options) -> GradeResult:
    """Create the task's sandbox, run the agent's commands, grade, close."""
    task = load_task(task_dir)
    grader = HarborGrader(task, factory=factory, **grader_options)
    spec = spec_from_harbor_config(task.name, task.environment_dir, task.config.environment)
    async with await factory.create(spec) as sandbox:
        await grader.record_baseline(sandbox)
        for command in agent:
            result = await sandbox.exec(command, timeout=30)
            assert result.ok, (command, result)
        return await grader.grade(sandbox)


def script(body: str) -> str:
    return "#!/bin/bash\n" + body + "\n"


async def test_reward_txt(factory, make_task):
    result = await grade(factory, make_task(test_sh=script("echo 0.5 > /logs/verifier/reward.txt")))
    assert result.reward == 0.5 and result.rewards == {"reward": 0.5}


async def test_reward_json_wins_over_reward_txt(factory, make_task):
    body = (
        "echo 1 > /logs/verifier/reward.txt\n"
        'echo \'{"reward": 0.25, "lint": 1}\' > /logs/verifier/reward.json'
    )
    result = await grade(factory, make_task(test_sh=script(body)))
    assert result.rewards == {"reward": 0.25, "lint": 1.0}
    assert result.reward == 0.25


async def test_exit_code_is_ignored_and_output_is_kept(factory, make_task):
    body = "echo checking things\necho 1 > /logs/verifier/reward.txt\nexit 3"
    result = await grade(factory, make_task(test_sh=script(body)))
    assert result.reward == 1.0
    assert "checking things" in result.test_output


async def test_a_failing_test_script_with_a_zero_reward_scores_zero(factory, make_task):
    body = "echo 0 > /logs/verifier/reward.txt\nfalse"
    assert (await grade(factory, make_task(test_sh=script(body)))).reward == 0.0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("echo no reward here", "the tests wrote no reward"),
        (": > /logs/verifier/reward.txt", "reward.txt: the reward file is empty"),
        ("echo nan > /logs/verifier/reward.txt", "non-finite"),
        ("echo passed > /logs/verifier/reward.txt", "not a number"),
        ('echo \'{"reward": "yes"}\' > /logs/verifier/reward.json', "non-numeric"),
        ("echo '{' > /logs/verifier/reward.json", "not valid JSON"),
        ("echo '{}' > /logs/verifier/reward.json", "empty object"),
        # reward.json exists but is empty: an error even though reward.txt is fine.
        (
            "echo 1 > /logs/verifier/reward.txt; : > /logs/verifier/reward.json",
            "reward.json: the reward file is empty",
        ),
        ("mkdir /logs/verifier/reward.txt", "is not a regular file"),
    ],
)
async def test_missing_or_invalid_reward_is_a_grading_error(factory, make_task, body, problem):
    with pytest.raises(GradingError) as info:
        await grade(factory, make_task(test_sh=script(body)))
    assert problem in str(info.value)
    assert info.value.kind == "grading"
    assert "'demo'" in str(info.value)


async def test_verifier_timeout_is_a_grading_error(factory, make_task):
    toml = "[verifier]\ntimeout_sec = 1.0\n"
    body = "echo started\nsleep 30\necho 1 > /logs/verifier/reward.txt"
    with pytest.raises(GradingError, match=r"timed out after 1 s") as info:
        await grade(factory, make_task(task_toml=toml, test_sh=script(body)))
    assert "started" in info.value.test_output
    assert str(info.value).endswith("; test.sh output ends with: started")


async def test_a_test_script_that_fails_without_a_reward_is_quoted_in_the_error(factory, make_task):
    """A broken test.sh writes no reward; what it printed (the last lines) says why."""
    body = "echo checking\nif then fi (\necho 1 > /logs/verifier/reward.txt"
    with pytest.raises(GradingError) as info:
        await grade(factory, make_task(test_sh=script(body)))
    message = str(info.value)
    assert message.startswith("grading task 'demo' failed: the tests wrote no reward: neither")
    assert "; test.sh output ends with: checking | /tests/test.sh: line 3: syntax error" in message
    quiet = make_task("quiet", test_sh=script("true"))
    with pytest.raises(GradingError) as info:  # nothing printed: nothing quoted
        await grade(factory, quiet)
    assert str(info.value).endswith("reward.txt exists")


async def test_binary_fixtures_arrive_byte_for_byte(factory, make_task):
    blob = bytes(range(256)) * 64 + b"\x00\r\n\xff" * 100
    digest = hashlib.sha256(blob).hexdigest()
    body = (
        f'if [ "$(sha256sum /tests/fixtures/blob.bin | cut -d" " -f1)" = {digest} ]; '
        "then echo 1; else echo 0; fi > /logs/verifier/reward.txt"
    )
    task = make_task(test_sh=script(body), files={"tests/fixtures/blob.bin": blob})
    assert (await grade(factory, task)).reward == 1.0


async def test_verifier_env_and_workdir(factory, make_task):
    toml = '[verifier.env]\nEXPECTED = "yes please"\n'
    body = (
        'if [ "$EXPECTED" = "yes please" ] && [ "$PWD" = /app ]; then echo 1; else echo 0; fi'
        " > /logs/verifier/reward.txt"
    )
    assert (await grade(factory, make_task(task_toml=toml, test_sh=script(body)))).reward == 1.0


# ---- forged rewards ---------------------------------------------------------------------

NO_REWARD = script("echo this test forgot to write a reward")
REWARD_ZERO = script("sleep 0.5; echo 0 > /logs/verifier/reward.txt")
# The same honest 0, then a pause before the grader reads it: a still-running forger gets many
# turns to overwrite it, so the unguarded counterfactual below does not hang on a race.
REWARD_ZERO_THEN_WAIT = script("sleep 0.5; echo 0 > /logs/verifier/reward.txt; sleep 2")


async def test_reward_file_written_by_the_agent_is_deleted(factory, make_task):
    forge = [
        "echo 1 > /logs/verifier/reward.txt",
        "echo '{\"reward\": 1}' > /logs/verifier/reward.json",
    ]
    with pytest.raises(GradingError, match="wrote no reward"):
        await grade(factory, make_task("a", test_sh=NO_REWARD), forge)
    assert (await grade(factory, make_task("b", test_sh=REWARD_ZERO), forge)).reward == 0.0


async def test_background_process_rewriting_the_reward_is_stopped(factory, make_task):
    forge = [
        "nohup bash -c 'while true; do echo 1 > /logs/verifier/reward.txt; sleep 0.02; done' "
        ">/dev/null 2>&1 &",
        "setsid bash -c 'while true; do echo 1 > /logs/verifier/reward.txt; sleep 0.02; done' "
        ">/dev/null 2>&1 < /dev/null &",
    ]
    with pytest.raises(GradingError, match="wrote no reward"):
        await grade(factory, make_task("a", test_sh=NO_REWARD), forge)
    assert (await grade(factory, make_task("b", test_sh=REWARD_ZERO), forge)).reward == 0.0
    # Without the guard the writer overwrites the honest 0 while the tests still run (a forged
    # 1), or at best breaks the reset: never the honest 0. The guard is what makes grading clean.
    try:
        unguarded = (
            await grade(
                factory,
                make_task("c", test_sh=REWARD_ZERO_THEN_WAIT),
                forge,
                stop_agent_processes=False,
            )
        ).reward
    except GradingError as exc:
        assert "not an empty directory after the reset" in str(exc)
    else:
        assert unguarded == 1.0


async def test_sabotaged_verifier_dir_is_restored(factory, make_task):
    for index, sabotage in enumerate(
        [
            ["chmod 000 /logs/verifier"],
            ["rm -rf /logs/verifier", "echo 1 > /logs/verifier"],
            [
                "rm -rf /logs/verifier",
                "mkdir -p /tmp/fake",
                "echo 1 > /tmp/fake/reward.txt",
                "ln -s /tmp/fake /logs/verifier",
            ],
        ]
    ):
        task = make_task(f"s{index}", test_sh=REWARD_ZERO)
        assert (await grade(factory, task, sabotage)).reward == 0.0, sabotage


async def test_files_planted_in_tests_are_removed(factory, make_task):
    body = "if [ -e /tests/planted.sh ]; then echo 1; else echo 0; fi > /logs/verifier/reward.txt"
    plant = ["echo 'echo 1 > /logs/verifier/reward.txt' > /tests/planted.sh"]
    assert (await grade(factory, make_task(test_sh=script(body)), plant)).reward == 0.0


async def test_shell_state_left_by_the_agent_does_not_reach_the_tests(factory, make_task):
    """The sandbox keeps `cd` and `export` between commands; Harbor's tests run in the
    environment's own workdir and variables, so a fake `grep` on PATH must not be used."""
    fake_grep = "printf '#!/bin/sh\\necho 1 > /logs/verifier/reward.txt\\n' > /tmp/fake/grep"
    agent = [
        "mkdir -p /tmp/fake",
        fake_grep,
        "chmod +x /tmp/fake/grep",
        "export PATH=/tmp/fake:$PATH LD_PRELOAD=/nonexistent.so MARKER=agent",
        "cd /tmp",
    ]
    body = (
        'if [ "$PWD" = /app ] && [ -z "$MARKER" ] && [ -z "$LD_PRELOAD" ] '
        "&& echo abc | grep -q b; then echo 0.5; else echo 0; fi > /logs/verifier/reward.txt"
    )
    result = await grade(factory, make_task(test_sh=script(body)), agent)
    assert result.reward == 0.5


async def test_a_background_process_cannot_restore_the_shell_state_after_the_reset(
    factory, make_task
):
    """The agent's processes are stopped before the shell state is reset: a loop that keeps
    writing its variables into the saved state cannot get them to test.sh."""
    state = f"{STATE_DIR}/env"
    forge = f"cp /tmp/base {state}.new && mv {state}.new {state}"  # always a whole state file
    agent = [
        "export -p > /tmp/base; echo 'declare -x FORGED=\"1\"' >> /tmp/base",
        f"nohup bash -c 'while :; do {forge}; done' >/dev/null 2>&1 & sleep 0.2",
    ]
    body = "echo ${FORGED:-0} > /logs/verifier/reward.txt"
    for attempt in range(3):
        task = make_task(f"forge{attempt}", test_sh=script(body))
        assert (await grade(factory, task, agent)).reward == 0.0


# ---- separate verifier environment ------------------------------------------------------


async def test_separate_verifier_with_bundled_tests_image(factory, make_task):
    """tests/Dockerfile builds the verifier's own environment with its own /tests (nothing is
    uploaded: the decoy tests/test.sh never runs); of the agent's sandbox only
    /logs/artifacts reaches it."""
    body = (
        'if [ "$(cat /logs/artifacts/answer.txt)" = 42 ] && [ ! -e /app/out.txt ]; '
        "then echo 1; else echo 0; fi > /logs/verifier/reward.txt"
    )
    files = {
        "tests/Dockerfile": "FROM debian:bookworm-slim\nCOPY grade.sh /tests/test.sh\n",
        "tests/grade.sh": script(body),
    }
    separate = '[verifier]\nenvironment_mode = "separate"\n'
    decoy = script("echo 0.1 > /logs/verifier/reward.txt")
    agent = [
        "mkdir -p /logs/artifacts",
        "echo 42 > /logs/artifacts/answer.txt",
        "touch /app/out.txt",
    ]
    solved = make_task("solved", task_toml=separate, test_sh=decoy, files=files)
    assert (await grade(factory, solved, agent)).reward == 1.0
    idle = make_task("idle", task_toml=separate, test_sh=decoy, files=files)
    assert (await grade(factory, idle)).reward == 0.0


async def test_a_verifier_environment_that_does_not_build_is_a_sandbox_failure(factory, make_task):
    """The tests never ran: not a grading error (a task whose tests give no reward)."""
    files = {"tests/Dockerfile": "FROM debian:bookworm-slim\nRUN exit 3\n"}
    separate = '[verifier]\nenvironment_mode = "separate"\n'
    task = make_task("unbuildable-verifier", task_toml=separate, files=files)
    with pytest.raises(EnvironmentFailure, match="could not create the verifier environment") as e:
        await grade(factory, task)
    assert e.value.kind == "sandbox" and not isinstance(e.value, GradingError)


async def test_separate_verifier_from_the_task_environment_gets_artifacts_and_tests(
    factory, make_task
):
    """Without a tests/Dockerfile the verifier gets a fresh copy of the task's environment,
    the task's `artifacts` and the uploaded tests/."""
    toml = 'artifacts = ["/app/result.txt"]\n[verifier]\nenvironment_mode = "separate"\n'
    body = (
        'if [ "$(cat /app/result.txt)" = done ] && [ ! -e /app/scratch ]; '
        "then echo 1; else echo 0; fi > /logs/verifier/reward.txt"
    )
    task = make_task(task_toml=toml, test_sh=script(body))
    agent = ["echo done > /app/result.txt", "touch /app/scratch"]
    assert (await grade(factory, task, agent)).reward == 1.0


async def test_separate_verifier_needs_a_factory(make_task):
    task = load_task(make_task(task_toml='[verifier]\nenvironment_mode = "separate"\n'))
    require_bwrap()
    factory = make_factory("local")
    spec = spec_from_harbor_config(task.name, task.environment_dir, task.config.environment)
    async with await factory.create(spec) as sandbox:
        with pytest.raises(GradingError, match="no sandbox factory"):
            await HarborGrader(task).grade(sandbox)
