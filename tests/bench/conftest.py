"""Fixtures of the benchmark tests: tiny random models saved as model folders (with the SmolLM2
tokenizer), which the benchmarks load by path exactly as they load the embedded model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, make_tiny_model, smollm2_tokenizer) -> dict[str, str]:
    """``student`` and ``teacher``: two tiny Llamas with different weights."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for name, seed in (("student", 1), ("teacher", 2)):
        folder = root / name
        make_tiny_model(seed=seed).save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        out[name] = str(folder)
    return out
