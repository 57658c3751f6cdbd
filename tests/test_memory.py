"""keep_freed_memory: inside it, a freed large block is reused without new page faults (glibc only)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from stencil_cli.base import memory

# Measured in a fresh interpreter with glibc's own malloc/free. In the test runner's process the heap's state
# after hundreds of tests decides where a block lands; and torch's 64-byte-aligned allocations
# (posix_memalign) of one 64 MiB block touched fresh pages in about half of fresh processes even inside the
# block, while plain malloc reused its pages every time. The setting under test is the allocator's, so the
# test asks the allocator directly.
MEASURE = """
import ctypes, json, resource
from stencil_cli.base import memory

libc = memory._glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
SIZE = 64 * 2**20

def served_from_the_heap():
    block = libc.malloc(SIZE)
    below_the_break = block < libc.sbrk(0)  # mmap'd blocks lie far above the heap's end
    libc.free(block)
    return below_the_break

def filled_and_freed():
    block = libc.malloc(SIZE)
    libc.memset(block, 1, SIZE)
    libc.free(block)

def faults():
    filled_and_freed()  # one round first: the block exists and was freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    filled_and_freed()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

outside = faults()
with memory.keep_freed_memory() as kept:
    inside = faults()
    heap_inside = served_from_the_heap()
result = {"kept": kept, "outside": outside, "inside": inside, "after": faults()}
result.update(heap_inside=heap_inside, heap_after=served_from_the_heap())
print(json.dumps(result))
"""


def _faults_of_a_second_64_mib_block() -> dict[str, int]:
    """Minor page faults of filling a second 64 MiB block before, inside and after `keep_freed_memory`."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's allocator only")
def test_a_freed_large_block_is_reused_inside_and_remapped_outside() -> None:
    pages = 64 * 2**20 // resource.getpagesize()
    got = _faults_of_a_second_64_mib_block()
    assert got["kept"]
    assert got["outside"] > pages // 2, got  # outside: mmap'd fresh, faulted in again
    assert got["inside"] < pages // 20, got  # inside: the heap's pages, reused
    assert got["heap_inside"], got  # inside: served from the heap, never mmap'd
    assert got["after"] > pages // 2, got  # afterwards: freed memory goes back to the kernel again
    assert not got["heap_after"], got  # afterwards: large blocks are mmap'd again
