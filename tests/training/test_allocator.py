"""Freed tensor memory leaves the process when the sampler asks for it."""

from __future__ import annotations

import ctypes.util
import platform

import psutil
import pytest
import torch

from training.allocator import return_free_memory


@pytest.mark.skipif(
    platform.system() != "Linux" or "libc.so" not in str(ctypes.util.find_library("c")),
    reason="malloc_trim is glibc's (Linux)",
)
def test_freed_tensors_leave_the_process_once_returned():
    process = psutil.Process()
    # glibc raises its mmap threshold when an mmapped block is freed: free one first, as any
    # training step does, so the blocks below come from the heap and stay resident when freed.
    first = torch.ones(4 << 20, dtype=torch.uint8)
    del first
    before = process.memory_info().rss
    blocks = [torch.ones(256 << 10, dtype=torch.uint8) for _ in range(1200)]  # ~300 MB
    assert process.memory_info().rss - before > 250e6
    del blocks
    assert return_free_memory()
    assert process.memory_info().rss - before < 50e6
