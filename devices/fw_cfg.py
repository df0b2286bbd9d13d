"""QEMU's firmware configuration device (fw_cfg), as firmware such as SeaBIOS reads it.

The interface is QEMU's `docs/specs/fw_cfg.rst`, on the x86 I/O ports
(`PORT` = 0x510, twelve ports):

- offset 0: the selector, written 16 bits wide; it picks an item and resets
  the read offset to 0. Bit 14 asks to write the item, bit 15 marks an
  architecture-specific key; pyvmm has no writable items, so data writes are
  ignored.
- offset 1: the data port; each byte read returns the next byte of the item,
  and zeros past its end (and for keys nobody set: firmware treats a zero as
  "absent", while all ones would make SeaBIOS believe in 65535 ACPI tables).
- offsets 4-11: the DMA address, a 64-bit big-endian register (4 = the high
  half, 8 = the low half). The write that completes the low half starts the
  transfer, which is over before the write returns. Reads return the
  signature "QEMU CFG".

A DMA descriptor in guest memory is big-endian: be32 control, be32 length,
be64 address. Control bits: SELECT (with the key in the upper 16 bits), then
one of READ (copy the item into guest memory, zeros past its end), SKIP
(advance the offset) or WRITE (refused here). The device writes the control
word back as 0, or with ERROR set when the guest's buffer is not RAM or it
asked to write. Every address and length comes from the guest and is checked
against guest memory before anything is copied.

Items are added by key (`add_item`) or as named files (`add_file`), which get
keys from 0x20 upward and appear in the file directory (key 0x19: be32 count,
then per file be32 size, be16 key, be16 reserved, a 56-byte NUL-padded name).
"""

from __future__ import annotations

import logging
import struct

from devices.board import Board
from devices.log_once import LogOnce
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

PORT_COUNT = 12
SELECTOR_OFFSET = 0
DATA_OFFSET = 1
DMA_ADDRESS_OFFSET = 4
DMA_ADDRESS_SIZE = 8

# Keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h and hw/i386/fw_cfg.h).
KEY_SIGNATURE = 0x00
KEY_ID = 0x01
KEY_RAM_SIZE = 0x03
KEY_NOGRAPHIC = 0x04
KEY_NB_CPUS = 0x05
KEY_BOOT_MENU = 0x0E
KEY_MAX_CPUS = 0x0F
KEY_FILE_DIR = 0x19
KEY_FILE_FIRST = 0x20
KEY_ARCH_LOCAL = 0x8000
KEY_IRQ0_OVERRIDE = KEY_ARCH_LOCAL + 2
KEY_WRITE_CHANNEL = 0x4000  # selector bit: "I mean to write"; not part of the key

SIGNATURE = b"QEMU"
ID_TRADITIONAL = 1 << 0  # the selector/data ports
ID_DMA = 1 << 1  # the DMA interface
DMA_SIGNATURE = b"QEMU CFG"  # what a read of the DMA address register returns

DMA_CTL_ERROR = 1 << 0
DMA_CTL_READ = 1 << 1
DMA_CTL_SKIP = 1 << 2
DMA_CTL_SELECT = 1 << 3
DMA_CTL_WRITE = 1 << 4
DMA_DESCRIPTOR = struct.Struct(">IIQ")  # control, length, address

FILE_NAME_SIZE = 56  # including the terminating NUL
FILE_DIR_ENTRY = struct.Struct(">IHH56s")
# Zero-filling a guest buffer past an item's end goes in pieces of this size,
# so a guest asking for gigabytes of zeros never makes pyvmm allocate them.
ZERO_CHUNK = 1 << 20


class FwCfg:
    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._items: dict[int, bytes] = {
            KEY_SIGNATURE: SIGNATURE,
            KEY_ID: struct.pack("<I", ID_TRADITIONAL | ID_DMA),
        }
        self._files: list[tuple[str, int]] = []  # (name, key), in the order they were added
        self._item = b""
        self._offset = 0
        self._dma_address = bytearray(DMA_ADDRESS_SIZE)
        self._odd = LogOnce(log, "fw_cfg")
        self._update_directory()

    # -- what the machine puts in --------------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Set the item behind `key` (one of the KEY_ constants)."""
        if key in (KEY_SIGNATURE, KEY_ID, KEY_FILE_DIR) or KEY_FILE_FIRST <= key < KEY_ARCH_LOCAL:
            raise ValueError(f"fw_cfg key {key:#x} is the device's own")
        self._items[key] = bytes(data)

    def add_file(self, name: str, data: bytes) -> int:
        """Add a named file (`etc/e820`, `bootorder`, ...); returns the key it got."""
        encoded = name.encode()
        if not encoded or len(encoded) >= FILE_NAME_SIZE or b"\0" in encoded:
            raise ValueError(f"bad fw_cfg file name {name!r}")
        if any(existing == name for existing, _ in self._files):
            raise ValueError(f"fw_cfg file {name!r} added twice")
        key = KEY_FILE_FIRST + len(self._files)
        if key >= KEY_ARCH_LOCAL:
            raise ValueError("too many fw_cfg files")
        self._files.append((name, key))
        self._items[key] = bytes(data)
        self._update_directory()
        return key

    def _update_directory(self) -> None:
        entries = [FILE_DIR_ENTRY.pack(len(self._items[key]), key, 0, name.encode())
                   for name, key in self._files]
        self._items[KEY_FILE_DIR] = struct.pack(">I", len(entries)) + b"".join(entries)

    # -- the guest's side ----------------------------------------------------

    def select(self, key: int) -> None:
        self._item = self._items.get(key & ~KEY_WRITE_CHANNEL, b"")
        self._offset = 0

    def read(self, offset: int, size: int) -> int:
        if offset == DATA_OFFSET:
            return int.from_bytes(self._take(size), "little")
        if DMA_ADDRESS_OFFSET <= offset and offset + size <= DMA_ADDRESS_OFFSET + DMA_ADDRESS_SIZE:
            start = offset - DMA_ADDRESS_OFFSET
            return int.from_bytes(DMA_SIGNATURE[start : start + size], "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR_OFFSET and size >= 2:
            self.select(value & 0xFFFF)
        elif DMA_ADDRESS_OFFSET <= offset and offset + size <= DMA_ADDRESS_OFFSET + DMA_ADDRESS_SIZE:
            # The bytes on the bus are the register's big-endian bytes at that position.
            start = offset - DMA_ADDRESS_OFFSET
            self._dma_address[start : start + size] = value.to_bytes(size, "little")
            if start + size == DMA_ADDRESS_SIZE:
                descriptor = int.from_bytes(self._dma_address, "big")
                self._dma_address[:] = bytes(DMA_ADDRESS_SIZE)
                self.dma(descriptor)
        else:
            self._odd("write", "ignored %d-byte write of %#x at offset %d", size, value, offset)

    def _take(self, length: int) -> bytes:
        """The next `length` bytes of the selected item, zeros past its end."""
        chunk = self._item[self._offset : self._offset + length]
        self._offset += length
        return chunk + bytes(length - len(chunk))

    def dma(self, descriptor_address: int) -> None:
        """Run the DMA descriptor at `descriptor_address` (guest-physical)."""
        try:
            raw = self._memory.read(descriptor_address, DMA_DESCRIPTOR.size)
        except GuestMemoryError:
            # Nowhere to report the error: the guest's own descriptor is not RAM.
            self._odd("descriptor", "DMA descriptor at %#x is not in guest RAM", descriptor_address)
            return
        control, length, address = DMA_DESCRIPTOR.unpack(raw)
        if control & DMA_CTL_SELECT:
            self.select(control >> 16)
        status = 0
        written = []
        if control & DMA_CTL_READ:
            status = self._dma_read(address, length)
            if not status:
                written.append((address, length))
        elif control & DMA_CTL_WRITE:
            self._odd("dma-write", "DMA write refused: pyvmm's fw_cfg items are read-only")
            status = DMA_CTL_ERROR
        elif control & DMA_CTL_SKIP:
            self._offset += length
        self._memory.write(descriptor_address, struct.pack(">I", status))
        written.append((descriptor_address, 4))
        self._memory.devices_wrote(written)

    def _dma_read(self, address: int, length: int) -> int:
        if not self._memory.contains(address, length):
            self._odd("dma-range", "DMA read into %#x+%#x, which is not guest RAM", address, length)
            return DMA_CTL_ERROR
        data = self._item[self._offset : self._offset + length]
        self._offset += length
        self._memory.write(address, data)
        for start in range(len(data), length, ZERO_CHUNK):
            self._memory.write(address + start, bytes(min(ZERO_CHUNK, length - start)))
        return 0


# -- where it sits ---------------------------------------------------------------------

PORT = 0x510  # selector, data and DMA address: PORT_COUNT ports


def plug(board: Board) -> FwCfg:
    """An empty fw_cfg on its ports (boot/firmware.py fills it with the machine's facts)."""
    fw_cfg = FwCfg(board.memory)
    board.pio.register(PORT, PORT_COUNT, fw_cfg, "fw_cfg")
    return fw_cfg
