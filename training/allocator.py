"""Hand freed tensor memory back to the operating system (Linux, glibc).

PyTorch's CPU allocator is plain ``malloc``. glibc maps a large block with its own ``mmap``
(unmapped on free) only while the block is above a threshold that it raises each time such a
block is freed (up to 32 MB); after the first freed weight or activation tensor, blocks of that
size come from the heap, where freed memory stays resident. So freeing many weight- or
activation-sized blocks lowers nothing by itself: measured with the embedded SmolLM2, releasing
the sampler's 300 MB merged copy when it was one tensor per weight left the process's RSS where
it was (the copy now lives in one buffer above the threshold, which leaves on free; training's
activations still come from the heap).
``malloc_trim`` returns the heap's free pages; the next use faults them in again (~0.1 s per
300 MB here), so call it where a large buffer was just freed and memory is about to peak.

Pinning the mmap threshold low instead (``mallopt(M_MMAP_THRESHOLD)``) also stops the growth, but
every large activation is then mapped and unmapped per use: a LoRA training step of the same
model took 3.1 s instead of 1.6 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def return_free_memory() -> bool:
    """Give the heap's free pages back to the OS; False where there is no ``malloc_trim``
    (not glibc), True otherwise (whether or not there was anything to give back)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
