"""Changing libunicorn's machine code in this process: the few primitives every patch needs.

pyvmm changes a handful of functions of the pinned Unicorn build where its
behaviour costs speed or correctness (vmm/tcg/code_pages.py,
vmm/tcg/native_syscall.py). Each change is a 5-byte `jmp rel32` written over
an instruction boundary in the library's text, to code placed in a page
mapped within reach of it; every patch first checks the SHA-256 of the bytes
it replaces, so another build is left alone.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MAP_FAILED = ctypes.c_void_p(-1).value
REL32_REACH = 1 << 31
PAGE = mmap.PAGESIZE


def jump(site: int, target: int) -> None:
    """Make the 5 bytes at `site` a jump to `target` (within rel32 reach)."""
    write_text(site, b"\xe9" + (target - (site + 5)).to_bytes(4, "little", signed=True))


def sha256(address: int, size: int) -> str:
    """The SHA-256 of `size` bytes of this process's memory at `address`."""
    return hashlib.sha256(ctypes.string_at(address, size)).hexdigest()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def map_near(site: int, code: bytes) -> int:
    """An executable page holding `code` within a rel32 jump of `site` (never unmapped)."""
    for distance in range(16 << 20, REL32_REACH - (64 << 20), 1 << 20):
        for hint in (site - distance, site + distance):
            hint &= ~(PAGE - 1)
            if hint <= 0:
                continue
            address = _libc.mmap(hint, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                                 -1, 0)
            if address in (None, MAP_FAILED):
                continue
            if address != hint:  # a kernel without MAP_FIXED_NOREPLACE treats it as a hint
                _libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(PAGE))
                continue
            ctypes.memmove(address, code, len(code))
            _protect(address, PAGE, PROT_READ | PROT_EXEC)
            return address
    raise OSError("no free page within reach of libunicorn")


def write_text(address: int, data: bytes) -> None:
    """Overwrite the library's code at `address` with `data`."""
    start = address & ~(PAGE - 1)
    length = (address + len(data) + PAGE - 1 & ~(PAGE - 1)) - start
    _protect(start, length, PROT_READ | PROT_WRITE | PROT_EXEC)
    try:
        ctypes.memmove(address, data, len(data))
    finally:
        _protect(start, length, PROT_READ | PROT_EXEC)


def free_slot(table: mmap.mmap, slots: int, slot_size: int, key: int) -> int | None:
    """The index of the first free slot of a table of per-engine slots that patched code
    looks up by `key` (each slot starts with its u64 key, 0 when free); None if none is free.

    A slot still holding `key` is freed first: it was left by an engine never closed,
    whose memory the new one reuses. The caller holds the table's lock, fills the slot,
    and writes the key last.
    """
    keys = [ctypes.c_uint64.from_buffer(table, slot * slot_size) for slot in range(slots)]
    for entry in keys:
        if entry.value == key:
            entry.value = 0
    return next((slot for slot, entry in enumerate(keys) if entry.value == 0), None)


def _protect(address: int, length: int, prot: int) -> None:
    if _libc.mprotect(address, length, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


class OncePerProcess:
    """A change to the library, made by `apply` at the first call and never again in this
    process (every engine shares the library); each call answers whether it is in effect.
    `apply` returns False, or raises OSError, to leave the library as it is; `unpatched`
    says what then happens instead, for the debug log."""

    def __init__(self, apply: Callable[[], bool], unpatched: str) -> None:
        self._apply = apply
        self._unpatched = unpatched
        self._lock = threading.Lock()
        self._in_effect: bool | None = None  # None: not tried yet

    def __call__(self) -> bool:
        with self._lock:
            if self._in_effect is None:
                try:
                    self._in_effect = self._apply()
                except OSError as err:
                    log.debug("software CPU: %s (%s)", self._unpatched, err)
                    self._in_effect = False
            return self._in_effect
