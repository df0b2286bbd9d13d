"""Device writes into guest RAM and the software CPU's translated code.

QEMU invalidates the blocks it translated from a page when that page is
written through its own engine (a guest store, or DMA by one of its
devices). pyvmm's devices write guest RAM directly through GuestMemory's
mappings, which Unicorn does not see, and Unicorn's own `uc_mem_write` does
not invalidate either (its `invalidate_and_set_dirty` is empty). Without
this module, a guest that reads a program from a virtio disk into pages
that held other code earlier (a page cache reusing freed pages does exactly
that) runs the old code.

So every device write (GuestMemory.devices_wrote) is reported here, and
the translations made from the written range are dropped with the two
engine functions QEMU itself uses: `qemu_ram_addr_from_host` (Unicorn keys
translations by QEMU's RAM offsets, not guest-physical addresses) and
`tb_invalidate_phys_range`. Both are exported by libunicorn; the version is
pinned (vmm/tcg/unicorn_lib.py).

The engine has no locks (Unicorn compiled them out), so only the thread that
owns the CPU may invalidate. On this accelerator virtio-blk and virtio-rng
work inside the MMIO hook of the vCPU that kicked them, which owns the CPU:
their writes are invalidated at once, before the guest runs another
instruction. Writes made by other threads (the I/O thread: network and
console input) wait in a queue until a vCPU thread takes the CPU for its
next slice, a few milliseconds at most; such data is copied by the guest
before anything runs it.

A device written in C (virtio-blk's request path) calls the engine's
`tb_invalidate_phys_range` itself, through `native_listener()`, when it
runs on the owner's thread: a 1 MiB read writes 256 scattered pages, and
reporting them through Python cost about as much as the read itself.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque

from vmm.memory import GuestMemory, NativeWriteListener
from vmm.tcg.unicorn_lib import uclib

RAM_ADDR_INVALID = (1 << 64) - 1

_ram_addr_from_host = uclib.qemu_ram_addr_from_host_x86_64
_ram_addr_from_host.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_ram_addr_from_host.restype = ctypes.c_uint64

_invalidate_range = uclib.tb_invalidate_phys_range_x86_64
_invalidate_range.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)
_invalidate_range.restype = None


class TranslationInvalidator:
    """Drops translated code that a device's write into guest RAM made stale."""

    def __init__(self, engine_handle: int, memory: GuestMemory, host_addresses: list[int]) -> None:
        """`host_addresses`: where each of `memory.regions` is mapped in this process (as given to Unicorn)."""
        self._handle = engine_handle
        # (guest start, guest end, RAM offset of the start) per region.
        self._regions: list[tuple[int, int, int]] = []
        for region, host in zip(memory.regions, host_addresses, strict=True):
            ram_addr = _ram_addr_from_host(engine_handle, host)
            if ram_addr == RAM_ADDR_INVALID:
                raise RuntimeError(f"Unicorn has no RAM block at host address {host:#x}")
            self._regions.append((region.guest_address, region.end, ram_addr))
        self._native = NativeWriteListener(
            ctypes.cast(_invalidate_range, ctypes.c_void_p).value, ctypes.cast(engine_handle, ctypes.c_void_p).value,
            tuple(ram_addr for _start, _end, ram_addr in self._regions))
        self._pending: deque[list[tuple[int, int]]] = deque()
        self._owner_thread: int | None = None
        self.invalidations = 0  # calls into the engine, for tests

    def start_owning(self) -> None:
        """The calling thread owns the CPU from now on (until `stop_owning`): drain, then invalidate inline."""
        self._owner_thread = threading.get_ident()
        pending = self._pending
        while pending:
            self._invalidate(pending.popleft())

    def stop_owning(self) -> None:
        self._owner_thread = None

    def devices_wrote(self, ranges: list[tuple[int, int]]) -> None:
        """GuestMemory's listener: devices wrote these (guest-physical address, length) ranges."""
        if threading.get_ident() == self._owner_thread:
            self._invalidate(ranges)
        else:
            self._pending.append(ranges)

    def native_listener(self) -> NativeWriteListener | None:
        """GuestMemory's native listener: the engine's own invalidation, called with RAM offsets,
        for the thread that owns the CPU only (None on any other)."""
        return self._native if threading.get_ident() == self._owner_thread else None

    def _invalidate(self, ranges: list[tuple[int, int]]) -> None:
        # A read from disk scatters into many pages (a 1 MiB read into 256 pages of a
        # user buffer, mostly adjacent but in no particular order): one call into the
        # engine (about 1 us) per run of adjacent or overlapping ranges, in address order.
        run_start = run_end = -1
        for address, length in sorted(ranges):
            if address <= run_end:
                run_end = max(run_end, address + length)
                continue
            if run_end > run_start:
                self._invalidate_run(run_start, run_end)
            run_start, run_end = address, address + length
        if run_end > run_start:
            self._invalidate_run(run_start, run_end)

    def _invalidate_run(self, address: int, end: int) -> None:
        for start, region_end, ram_addr in self._regions:
            low, high = max(address, start), min(end, region_end)
            if low < high:
                _invalidate_range(self._handle, ram_addr + (low - start), ram_addr + (high - start))
                self.invalidations += 1
