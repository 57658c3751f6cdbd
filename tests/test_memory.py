"""keep_freed_memory: inside it, a freed large block is reused without new page faults (glibc only)."""

from __future__ import annotations

import resource

import pytest
import torch

from stencil_cli.base import memory


def _faults_of_a_fresh_64_mib_tensor() -> int:
    """Minor page faults of allocating, filling and freeing a 64 MiB tensor (after one such round)."""
    torch.ones(16 * 2**20).sum()  # one round first: the block exists and was freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's allocator only")
def test_a_freed_large_block_is_reused_inside_and_remapped_outside() -> None:
    pages = 64 * 2**20 // resource.getpagesize()
    assert _faults_of_a_fresh_64_mib_tensor() > pages // 2  # outside: mmap'd fresh, faulted in again
    with memory.keep_freed_memory() as kept:
        assert kept
        assert _faults_of_a_fresh_64_mib_tensor() < pages // 20  # inside: the heap's pages, reused
    assert _faults_of_a_fresh_64_mib_tensor() > pages // 2  # the defaults are back afterwards
