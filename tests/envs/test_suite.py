"""The bundled suite through the real check command: every task scores 1 with its oracle and
0 with the no-op agent, on the local (bubblewrap) and docker backends. The command's own
behaviour: failures labelled by what failed, tasks that missed ``expect`` named, ``output``
checked first and written whole, the table's text shown as written, Ctrl-C without a
traceback and with the finished tasks' results kept."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from envs.harbor.check import CheckAgent, CheckFailure, CheckResult
from envs.harbor.tasks import load_tasks
from recipes.harbor.check import CheckConfig, print_table, write_results
from sandboxes.testing import require_bwrap, require_docker

REPO = Path(__file__).resolve().parents[2]


def run_check(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recipes.harbor.check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("local", marks=pytest.mark.bwrap),
        pytest.param("docker", marks=pytest.mark.docker),
    ],
)
@pytest.mark.parametrize(("agent", "expected"), [("oracle", 1.0), ("nop", 0.0)])
def test_bundled_suite(backend, agent, expected, tmp_path):
    require_docker() if backend == "docker" else require_bwrap()
    output = tmp_path / "results.json"
    proc = run_check(
        "bundled",
        f"backend={backend}",
        f"agent={agent}",
        f"expect={expected:g}",
        f"output={output}",
        "concurrency=4",
    )
    results = json.loads(output.read_text())
    assert sorted(r["task"] for r in results) == sorted(t.name for t in load_tasks("bundled"))
    wrong = [r for r in results if r["reward"] != expected or r["error"] is not None]
    assert not wrong, wrong
    keys = {"task", "reward", "rewards", "error", "failure", "duration_s"}
    assert all(set(r) == keys and r["failure"] is None for r in results)
    assert all(r["rewards"] == {"reward": expected} for r in results)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{len(results)} tasks: {len(results)} graded, mean reward {expected:.3f}\n" in (
        proc.stdout
    )


@pytest.mark.bwrap
def test_check_exits_non_zero_on_unmet_expectation_and_grading_errors(tmp_path, make_task):
    require_bwrap()
    output = tmp_path / "out.json"
    proc = run_check("bundled:test", "agent=oracle", "expect=0", f"output={output}")
    assert proc.returncode == 1
    assert "10 tasks: 10 graded, mean reward 1.000; 10 scored other than expect=0: " in proc.stdout
    broken = make_task("no-reward", test_sh="#!/bin/bash\necho nothing\n")
    proc = run_check(str(broken), f"output={output}")
    assert proc.returncode == 1
    (result,) = json.loads(output.read_text())
    assert result["reward"] is None and result["rewards"] is None
    assert "wrote no reward" in result["error"] and "output ends with: nothing" in result["error"]
    assert result["failure"] == "grading"
    assert "1 task: 0 graded; 1 not graded (grading error: 1)" in proc.stdout
    assert not output.with_name("out.json.tmp").exists()


@pytest.mark.bwrap
def test_check_labels_what_failed_and_names_the_tasks_that_missed_expect(tmp_path, make_task):
    require_bwrap()
    output = tmp_path / "out.json"
    unsolved = make_task("unsolved", solve_sh=None)
    always = make_task("always-one")  # writes 1 whatever the agent did
    proc = run_check(str(unsolved), str(always), "agent=oracle", f"output={output}")
    assert proc.returncode == 1
    unsolved_result, always_result = json.loads(output.read_text())
    assert unsolved_result["failure"] == "no_solution" and "grading" not in unsolved_result["error"]
    assert "solution/solve.sh" in unsolved_result["error"] and always_result["reward"] == 1.0
    assert "2 tasks: 1 graded, mean reward 1.000; 1 not graded (no solution: 1)" in proc.stdout

    proc = run_check(str(always), "agent=nop", "expect=0")
    assert proc.returncode == 1
    assert "1 task: 1 graded, mean reward 1.000; 1 scored other than expect=0: always-one" in (
        proc.stdout
    )
    assert "expected 0" in proc.stdout


def test_check_validates_output_and_backend_before_running_anything(tmp_path):
    proc = run_check("bundled", f"output={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output='{tmp_path}': is a folder; give the path of the JSON file" in proc.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    proc = run_check("bundled", f"output={a_file / 'out.json'}")
    assert proc.returncode == 2 and f"{a_file} is a file" in proc.stderr
    proc = run_check("bundled", "backend=harbor:nosuch")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown Harbor environment type 'nosuch'; expected one of docker" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no .tmp anywhere


def result(task: str, reward: float | None, error: str | None = None, **extra) -> CheckResult:
    return CheckResult(
        task, reward, None if reward is None else {"reward": reward}, error, 1.0, **extra
    )


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    taken = tmp_path / "results.json"
    taken.mkdir()  # became a folder after the arguments were checked
    with pytest.raises(OSError):
        write_results([result("a", 1.0)], taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_the_table_shows_task_and_test_text_as_written():
    """Brackets in what the tasks and tests wrote are not rich markup."""
    results = [
        result(
            "[bold]odd[/bold]",
            None,
            "tests/test.sh timed out after 3 s ([verifier].timeout_sec)",
            failure=CheckFailure.GRADING,
        ),
        result("fine", 1.0),
    ]
    console = Console(file=io.StringIO(), width=200)
    config = CheckConfig(paths=["x"], agent=CheckAgent.ORACLE, expect=1)
    print_table(results, config, console)
    text = console.file.getvalue()
    assert "([verifier].timeout_sec)" in text and "[bold]odd[/bold]" in text
    assert "grading error" in text
    assert "2 tasks: 1 graded, mean reward 1.000; 1 not graded (grading error: 1)" in text


@pytest.mark.bwrap
def test_ctrl_c_stops_the_check_in_one_line_with_exit_130(tmp_path, make_task):
    require_bwrap()
    slow = make_task("slow", solve_sh="#!/bin/bash\nsleep 60\n")
    output = tmp_path / "out.json"
    child = start_check(str(slow), f"output={output}")
    deadline = time.monotonic() + 120
    while not children(child.pid):  # the sandbox is up: the oracle is running
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err == f"interrupted after 0 of 1 tasks; output={output} not written\n"
    assert not output.exists() and not output.with_name("out.json.tmp").exists()


@pytest.mark.bwrap
def test_ctrl_c_keeps_the_results_of_the_tasks_that_finished(tmp_path, make_task):
    require_bwrap()
    quick = make_task("a-quick")
    slow = make_task("b-slow", solve_sh="#!/bin/bash\nsleep 617\n")
    output = tmp_path / "out.json"
    child = start_check(str(quick), str(slow), "concurrency=1", f"output={output}")
    deadline = time.monotonic() + 120
    while not running("sleep 617"):  # the quick task is graded, the slow one's oracle runs
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130
    assert err == f"interrupted after 1 of 2 tasks; their results are in output={output}\n"
    [result] = json.loads(output.read_text())
    assert (result["task"], result["reward"]) == ("a-quick", 1.0)
    assert not running("sleep 617")


def start_check(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.harbor.check", *arguments],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal, also when pytest runs in the background (SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def running(command: str) -> bool:
    found = subprocess.run(["pgrep", "-f", command], capture_output=True, check=False)
    return found.returncode == 0


def children(pid: int) -> list[str]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return found.stdout.split()


def test_check_reports_bad_paths_and_arguments(tmp_path):
    proc = run_check(str(tmp_path / "missing"))
    assert proc.returncode == 2 and "missing: does not exist" in proc.stderr
    proc = run_check("bundled", "agent=human")
    assert proc.returncode == 2 and "agent" in proc.stderr
    proc = run_check("agent=oracle")
    assert proc.returncode == 2 and "paths" in proc.stderr
