"""The CPU host-memory setting of the trainer (rlvr_fast.trainer.update.memory): applied on glibc, a clean
False elsewhere. Checked through glibc's own statistics (mallinfo2): blocks far above glibc's largest mmap threshold
come from the heap, the heap keeps its freed top, and malloc_trim hands free pages inside it back."""

from __future__ import annotations

import ctypes

import pytest

from rlvr_fast.trainer.update import memory

MiB = 1024 * 1024


class MallInfo2(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33): every field a size_t
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@pytest.fixture
def libc():
    libc = memory.glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_off_glibc_it_reports_false(monkeypatch):
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    memory.glibc.cache_clear()
    try:
        assert memory.glibc() is None
        assert memory.return_freed_host_memory() is False
        assert memory.release_free_host_memory() is False
    finally:
        memory.glibc.cache_clear()


def test_large_blocks_come_from_the_heap_which_keeps_its_freed_top(libc):
    assert memory.return_freed_host_memory() is True
    before = libc.mallinfo2()
    block = libc.malloc(64 * MiB)  # twice glibc's largest mmap threshold: its own mapping under any threshold
    assert block
    assert libc.mallinfo2().hblks == before.hblks, "a 64 MiB block was mmapped: M_MMAP_MAX is not 0"
    heap = libc.mallinfo2().arena
    libc.free(block)  # it joins the free top of the heap: 64 MiB, under the 512 MiB trim threshold
    assert libc.mallinfo2().arena == heap, "the heap shrank when its top block was freed: no trim threshold set"


def test_release_hands_free_pages_inside_the_heap_back(libc):
    assert memory.return_freed_host_memory() is True
    block = libc.malloc(64 * MiB)
    guard = libc.malloc(64)  # keeps the block off the heap's top: only malloc_trim can return its pages
    assert block and guard
    try:
        ctypes.memset(block, 1, 64 * MiB)  # make its pages resident
        libc.free(block)
        block = None
        resident = resident_bytes()
        assert memory.release_free_host_memory() is True
        assert resident - resident_bytes() >= 32 * MiB, "malloc_trim returned fewer pages than the freed block"
    finally:
        if block:
            libc.free(block)
        libc.free(guard)
