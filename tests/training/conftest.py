"""Fixtures of the training tests: the anyio backend. (The vLLM server they share with
tests/recipes is in tests/conftest.py.)"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/training run on asyncio through anyio's pytest plugin."""
    return "asyncio"
