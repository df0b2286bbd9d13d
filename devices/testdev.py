"""A scratch MMIO device for test guests (`boot --flat` machines; pc-testdev's memory too).

`size` bytes (64 by default) of byte-addressed registers: a write of any
size stores its bytes, a read of any size returns the bytes stored there. A
guest that writes values of 1, 2, 4 and 8 bytes and reads them back (and
reads parts of them) proves that MMIO of every size reaches a device with the
right offset, size and byte order, in both directions.
"""

from __future__ import annotations

from collections import deque

from devices.board import Board

TEST_DEVICE_SIZE = 0x1000
SCRATCH_BYTES = 64


class ScratchDevice:
    def __init__(self, size: int = SCRATCH_BYTES) -> None:
        self.scratch = bytearray(size)
        # The last accesses (kind, offset, size), for host-side tests; bounded, so a
        # guest looping over the device cannot grow pyvmm's memory.
        self.accesses: deque[tuple[str, int, int]] = deque(maxlen=64)

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("read", offset, size))
        if offset + size > len(self.scratch):
            return (1 << (8 * size)) - 1
        return int.from_bytes(self.scratch[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size))
        if offset + size <= len(self.scratch):
            self.scratch[offset : offset + size] = value.to_bytes(size, "little")


# -- where it sits: `boot --flat` machines only ------------------------------------

BASE = 0xD000_0000


def plug(board: Board) -> ScratchDevice:
    scratch = ScratchDevice()
    board.mmio.register(BASE, TEST_DEVICE_SIZE, scratch, "scratch")
    return scratch
