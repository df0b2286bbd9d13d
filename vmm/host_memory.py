"""Handing memory pyvmm no longer uses back to the host."""

from __future__ import annotations

import ctypes


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
