"""Fixtures of the recipe tests: tiny random models saved as model folders (with the SmolLM2
tokenizer), so recipes load them by path exactly as they load real models."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Async tests in tests/recipes run on asyncio through anyio's pytest plugin."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, make_tiny_model, smollm2_tokenizer) -> dict[str, str]:
    """``student``, ``teacher`` and ``teacher2``: three tiny Llamas with different weights."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for name, seed in (("student", 1), ("teacher", 2), ("teacher2", 3)):
        folder = root / name
        make_tiny_model(seed=seed).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        out[name] = str(folder)
    return out
