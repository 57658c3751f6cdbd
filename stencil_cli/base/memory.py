"""Keep freed memory in the process while a CPU training loop runs (glibc's allocator), to stop page faults.

A full-size training step on the CPU allocates and frees gigabytes (the decoder's gradients, Adam's
temporaries, the activations), much of it in blocks above glibc's mmap threshold (at most 32 MiB), which
glibc maps fresh on every allocation and unmaps on free; the top of the heap is trimmed back to the kernel
too. Every step then faults all of it in again: about 1 M minor page faults (4 GiB) per step on SD1.5, a
third of the step's CPU time spent in the kernel (docs/performance.md). Inside `keep_freed_memory` glibc
serves every block from its heap and never trims it, so a step reuses the previous step's pages; on leaving,
the defaults come back and the free memory is handed back to the kernel. Elsewhere (macOS, musl, Windows)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (malloc.h) and glibc's defaults for them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Inside the block, freed memory stays in the heap for reuse (no fresh mmap, no trim); yields whether
    the allocator could be told so."""
    libc = _glibc()
    if libc is None or not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
