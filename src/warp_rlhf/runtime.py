"""Process settings measured to matter on CPU (benchmarks/RESULTS.md)."""

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

    Every training step frees and re-allocates hundreds of MB of activations and gradients.
    By default glibc maps each large block fresh from the kernel and unmaps it on free, so every
    step pays page faults on it again; with this a step of SmolLM2-135M at batch 16 went from
    about 9.0 s to 7.5 s on 2 cores. The few blocks of 64 MB and more (a step's (B·L, V) logits
    and their gradient, the output layer's gradient and packed copy) are still mapped fresh:
    in the heap, blocks of their size that change a little from step to step leave holes the
    next step cannot use, and peak RSS crept up by 0.1 GB over 8 steps (3.92 against 4.03 GiB,
    steps no slower; benchmarks/NOTES.md). The cost is that the process keeps its peak heap.
    Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False
