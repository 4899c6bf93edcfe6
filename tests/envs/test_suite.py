"""The bundled suite through the real check command: every task scores 1 with its oracle and
0 with the no-op agent, on the local (bubblewrap) and docker backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from envs.harbor.tasks import load_tasks
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
    assert all(set(r) == {"task", "reward", "rewards", "error", "duration_s"} for r in results)
    assert all(r["rewards"] == {"reward": expected} for r in results)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{len(results)} tasks, 0 grading errors" in proc.stdout


@pytest.mark.bwrap
def test_check_exits_non_zero_on_unmet_expectation_and_grading_errors(tmp_path, make_task):
    require_bwrap()
    output = tmp_path / "out.json"
    proc = run_check("bundled:test", "agent=oracle", "expect=0", f"output={output}")
    assert proc.returncode == 1
    broken = make_task("no-reward", test_sh="#!/bin/bash\necho nothing\n")
    proc = run_check(str(broken), f"output={output}")
    assert proc.returncode == 1
    (result,) = json.loads(output.read_text())
    assert result["reward"] is None and result["rewards"] is None
    assert "wrote no reward" in result["error"]


def test_check_reports_bad_paths_and_arguments(tmp_path):
    proc = run_check(str(tmp_path / "missing"))
    assert proc.returncode == 2 and "missing: does not exist" in proc.stderr
    proc = run_check("bundled", "agent=human")
    assert proc.returncode == 2 and "agent" in proc.stderr
    proc = run_check("agent=oracle")
    assert proc.returncode == 2 and "paths" in proc.stderr
