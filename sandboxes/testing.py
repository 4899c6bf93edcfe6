"""Test helpers for anything that needs a real sandbox backend (used by tests/ conftests).

A missing backend skips the test with the reason, except in CI (``CI=true``), where a missing
docker daemon or bubblewrap is a broken machine and fails the test instead.
"""

from __future__ import annotations

import functools
import os


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    import pytest

    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _bwrap_problem() -> str | None:
    from sandboxes.local import bwrap_available

    return bwrap_available()


@functools.cache
def _docker_problem() -> str | None:
    from sandboxes.docker import docker_available

    return docker_available()


def require_bwrap() -> None:
    """Skip (or fail in CI) unless bubblewrap can create sandboxes here."""
    if (problem := _bwrap_problem()) is not None:
        skip_or_fail(problem)


def require_docker() -> None:
    """Skip (or fail in CI) unless a docker daemon answers."""
    if (problem := _docker_problem()) is not None:
        skip_or_fail(problem)
