"""Process-wide memory settings for training on CPU; called once at the edge of a process (the
CLI's start, a worker's start, the benchmark), never from library code."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


LARGE_BLOCK = 64 << 20
"""Blocks at least this large are mapped fresh from the kernel and unmapped on free."""


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks under `LARGE_BLOCK` from the heap and keep freed memory for reuse.

    Every training step frees and re-allocates hundreds of MB of activations and gradients. By
    default glibc maps each large block fresh from the kernel and unmaps it on free, so every step
    pays page faults on it again. The few blocks of 64 MB and more (a step's (B·L, V) logits and
    the output layer's gradient) are still mapped fresh: in the heap, blocks of their size that
    change a little from step to step leave holes the next step cannot use, and peak memory
    creeps up. The cost is that the process keeps its peak heap (benchmarks/NOTES.md has the
    figures). Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False
