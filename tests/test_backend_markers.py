"""The ``bwrap`` and ``docker`` markers (tests/conftest.py): with the backend missing, a marked
test skips naming the reason, or fails when ``CI=true``, before its fixtures are built.

A child pytest runs ``backend_markers_probe.py`` with no bwrap on PATH and DOCKER_HOST pointing
at a socket that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = "tests/backend_markers_probe.py"
NO_BWRAP = "bubblewrap (bwrap) is not installed"
NO_DOCKER = "no docker daemon answered at unix:///nonexistent/docker.sock"


def run_probe(tmp_path: Path, ci: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"PATH": str(tmp_path), "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    if ci:
        env["CI"] = "true"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", PROBE, "-q", "-rA", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out.stdout + out.stderr


def test_a_missing_backend_skips_with_the_reason(tmp_path: Path) -> None:
    out = run_probe(tmp_path, ci=False)
    assert "2 skipped" in out, out
    assert NO_BWRAP in out and NO_DOCKER in out, out
    assert "fixture built" not in out, out


def test_a_missing_backend_fails_in_ci(tmp_path: Path) -> None:
    out = run_probe(tmp_path, ci=True)
    assert "2 errors" in out and "skipped" not in out, out
    assert f"CI=true and {NO_BWRAP}" in out and f"CI=true and {NO_DOCKER}" in out, out
    assert "fixture built" not in out, out
