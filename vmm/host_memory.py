"""Host memory: asking for huge pages, and handing memory pyvmm no longer uses back to the host."""

from __future__ import annotations

import ctypes
import mmap


def ask_for_huge_pages(mapping: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Ask the host to back `length` bytes of `mapping` from `start` (page-aligned) with
    transparent huge pages, as QEMU does for guest RAM: 512 times fewer page faults to fill
    them, which KVM's own tables and a nested or emulated CPU make dear. A host without
    them keeps 4 KiB pages: slower, never wrong."""
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, len(mapping) - start if length is None else length)
    except (AttributeError, OSError):
        pass


def release_freed_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc's malloc_trim).

    Loading a kernel decompresses tens of megabytes through the C heap;
    freed, they stay resident in the heap until trimmed, and would count
    against pyvmm for as long as the guest runs. A no-op where the C library
    has no malloc_trim.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
