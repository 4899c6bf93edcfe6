"""Run in a child pytest by ``test_backend_markers.py``, where bubblewrap and docker are missing:
one test per backend marker, each behind a fixture that must never be built."""

from __future__ import annotations

import pytest


@pytest.fixture
def expensive() -> None:
    raise RuntimeError("fixture built although the backend is missing")


@pytest.mark.bwrap
def test_needs_bwrap(expensive: None) -> None:
    pass


@pytest.mark.docker
def test_needs_docker(expensive: None) -> None:
    pass
