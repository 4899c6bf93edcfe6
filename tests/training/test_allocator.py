"""Freed tensor memory leaves the process when the sampler asks for it."""

from __future__ import annotations

import ctypes.util
import platform
from pathlib import Path

import pytest
import torch

from training.allocator import return_free_memory


def anonymous_rss() -> int:
    """Resident anonymous memory in bytes (the heap; not mapped files such as model weights,
    whose resident pages the kernel may drop or fault in at any time)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(
    platform.system() != "Linux" or "libc.so" not in str(ctypes.util.find_library("c")),
    reason="malloc_trim is glibc's (Linux)",
)
def test_freed_tensors_leave_the_process_once_returned():
    # glibc raises its mmap threshold when an mmapped block is freed: free one first, as any
    # training step does, so the blocks below come from the heap and stay resident when freed.
    first = torch.ones(4 << 20, dtype=torch.uint8)
    del first
    # Earlier tests in this process may have left free pages resident in the heap, which the
    # blocks below would reuse without growing the process: start from a trimmed heap.
    return_free_memory()
    before = anonymous_rss()
    blocks = [torch.ones(256 << 10, dtype=torch.uint8) for _ in range(1200)]  # ~300 MB
    assert anonymous_rss() - before > 250e6
    del blocks
    assert return_free_memory()
    assert anonymous_rss() - before < 50e6
