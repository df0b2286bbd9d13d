"""Guest RAM: anonymous host mappings at guest-physical addresses.

Every access pyvmm makes to guest memory goes through `GuestMemory`, which
checks that the whole range lies inside one RAM region. Guest-supplied
addresses and lengths (descriptors, boot-time pointers) are therefore safe to
pass in: a bad one raises `GuestMemoryError`, never touches host memory.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from vmm.errors import GuestMemoryError, PyvmmError
from vmm.host_memory import ask_for_huge_pages
from vmm.layout import HIGH_RAM_START, MMIO_HOLE_START

# Untouched guest RAM then costs the host nothing and does not count against
# overcommit. (The constant reached the mmap module only in Python 3.12.)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

# Guest RAM starts on a host address that is a multiple of this and asks for transparent huge
# pages (madvise), as QEMU's does: KVM maps guest RAM with 2 MiB pages of its own tables only
# where the host's page is huge and the host and guest-physical addresses agree modulo 2 MiB
# (every region's guest address is a multiple of it). With 4 KiB pages every page the guest
# touches first costs an exit into the host kernel: a Linux boot on the nested KVM took
# about 17,700 of them against QEMU's 430, a third of the boot's time there.
HUGE_PAGE = 2 << 20


@dataclass
class MemoryRegion:
    guest_address: int
    size: int
    mapping: mmap.mmap  # the host mapping holding the region (RAM's is HUGE_PAGE larger)
    start: int = 0  # where in it the region starts

    def __post_init__(self) -> None:
        # The region's bytes, for Python's windows onto it. (C is handed the mapping itself, with
        # `start`: a buffer taken from a memoryview can outlive it when the GC breaks a cycle.)
        self.host = memoryview(self.mapping)[self.start : self.start + self.size]

    def host_address(self) -> int:
        """Where the region's first byte is in this process, for an accelerator to map."""
        return _address_of(self.mapping) + self.start

    def window(self, offset: int, length: int) -> memoryview:
        return self.host[offset : offset + length]

    @property
    def end(self) -> int:
        return self.guest_address + self.size

    def close(self) -> None:
        try:
            self.host.release()
            self.mapping.close()
        except BufferError:
            pass  # a view is still exported (e.g. to an accelerator); the GC frees it


def _address_of(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def _huge_page_aligned(length: int) -> tuple[mmap.mmap, int]:
    """`length` bytes of anonymous memory on a HUGE_PAGE boundary, backed by huge pages where
    the host allows: (a mapping HUGE_PAGE longer, where in it they start)."""
    mapping = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    start = -_address_of(mapping) % HUGE_PAGE
    ask_for_huge_pages(mapping, start, length)
    return mapping, start


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Split `size` bytes of RAM into (guest address, size) ranges around the MMIO hole."""
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (HIGH_RAM_START, size - MMIO_HOLE_START)]


class NativeWriteListener(NamedTuple):
    """GuestMemory's device-write listener as a C function, for devices written in C:
    `void function(void *context, uint64_t start, uint64_t end)`, told each written range
    as [start, end) in the listener's own numbering of RAM, in which the first byte of
    `GuestMemory.regions[i]` is `region_starts[i]`."""

    function: int  # addresses in this process
    context: int
    region_starts: tuple[int, ...]


class GuestMemory:
    # Set by an accelerator that keeps translations of guest code (the software
    # CPU): told the (address, length) ranges of each device write into guest RAM.
    device_write_listener: Callable[[list[tuple[int, int]]], None] | None = None
    # Set with it: the same listener as a C function, or None while the calling thread
    # may not call it (a compiled device then reports through devices_wrote).
    native_write_listener: Callable[[], NativeWriteListener | None] | None = None

    def __init__(self, size: int) -> None:
        if size < 1 << 20:
            raise PyvmmError(f"guest memory must be at least 1M, got {size} bytes")
        if size % 4096:
            raise PyvmmError(f"guest memory must be a multiple of 4K, got {size} bytes")
        self.size = size
        self.regions: list[MemoryRegion] = []
        for address, length in ram_layout(size):
            try:
                mapping, start = _huge_page_aligned(length)
            except OSError as err:
                self.close()
                raise PyvmmError(f"cannot allocate {length} bytes of guest memory: {err.strerror}") from None
            self.regions.append(MemoryRegion(address, length, mapping, start))
        self._starts = [r.guest_address for r in self.regions]
        # Low RAM starts at 0 and takes nearly every access: checked first.
        self._low, self._low_end = self.regions[0], self.regions[0].size

    def add_firmware(self, address: int, data: bytes) -> None:
        """Map `data` (a firmware image) at `address`, outside RAM: below 4 GiB, in the MMIO hole's top.

        Call before the accelerator maps memory. The region is writable like RAM
        (firmware never writes its own high copy; a guest that does only changes itself).
        """
        size = (len(data) + 4095) & ~4095
        if size == 0 or address % 4096 or any(
                address < region.end and region.guest_address < address + size for region in self.regions):
            raise PyvmmError(f"firmware of {len(data)} bytes does not fit at {address:#x}")
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping[: len(data)] = data
        self.regions.append(MemoryRegion(address, size, mapping))
        self.regions.sort(key=lambda region: region.guest_address)
        self._starts = [r.guest_address for r in self.regions]

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
        self._starts = []
        self._low_end = 0

    def _locate(self, address: int, length: int) -> tuple[MemoryRegion, int]:
        if 0 <= address and 0 <= length and address + length <= self._low_end:
            return self._low, address
        if address < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {address:#x}+{length:#x}")
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0:
            region = self.regions[index]
            offset = address - region.guest_address
            if offset + length <= region.size:
                return region, offset
        raise GuestMemoryError(f"guest range {address:#x}+{length:#x} is not RAM")

    def contains(self, address: int, length: int = 1) -> bool:
        if 0 <= address and 0 <= length and address + length <= self._low_end:
            return True  # low RAM, as in _locate: a queue walk asks this for every buffer
        try:
            self._locate(address, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, address: int, length: int) -> bytes:
        region, offset = self._locate(address, length)
        start = region.start + offset
        return region.mapping[start : start + length]

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(address, len(data))
        start = region.start + offset
        region.mapping[start : start + len(data)] = data

    def devices_wrote(self, ranges: list[tuple[int, int]]) -> None:
        """Devices wrote these (address, length) ranges of guest RAM (DMA): tell the accelerator."""
        listener = self.device_write_listener
        if listener is not None and ranges:
            listener(ranges)

    def view(self, address: int, length: int) -> memoryview:
        """A zero-copy window onto guest RAM; release it before closing the memory."""
        region, offset = self._locate(address, length)
        return region.window(offset, length)

    @contextmanager
    def views(self, ranges: list[tuple[int, int]]) -> Iterator[list[memoryview]]:
        """Windows onto the (address, length) ranges, released on leaving the block."""
        # A 1 MiB disk request is 256 ranges, nearly always in low RAM: those are sliced
        # here, with the check _locate makes; the others go through view().
        whole = self._low.host if self._low_end else None
        low_end = self._low_end if whole is not None else -1  # closed: everything through view()
        windows = [whole[address : address + length]
                   if 0 <= address and 0 <= length and address + length <= low_end
                   else self.view(address, length)
                   for address, length in ranges]
        try:
            yield windows
        finally:
            for window in windows:
                window.release()

    def fill(self, address: int, length: int, value: int = 0) -> None:
        self.write(address, bytes([value]) * length)

    def read_u8(self, address: int) -> int:
        return self.read(address, 1)[0]

    def read_u16(self, address: int) -> int:
        return int.from_bytes(self.read(address, 2), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def write_u16(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(2, "little"))

    def write_u64(self, address: int, value: int) -> None:
        self.write(address, value.to_bytes(8, "little"))
