"""In-memory forms of qcow2 tables: big-endian 64-bit tables and refcount blocks.

Tables are held as native-endian `array`s (converted once when read, once
when written) so lookups are plain indexing. Refcount blocks hold entries of
2**refcount_order bits: 1, 2 and 4-bit entries are packed least significant
bits first within each byte, wider ones are big-endian integers.
"""

from __future__ import annotations

import sys
from array import array

_BIG_ENDIAN_HOST = sys.byteorder == "big"
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


def table_from_bytes(data: bytes) -> array:
    """A table of big-endian u64 entries -> array('Q') of native ints."""
    table = array("Q")
    table.frombytes(data)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def table_to_bytes(table: array) -> bytes:
    if _BIG_ENDIAN_HOST:
        return table.tobytes()
    copy = array(table.typecode, table)
    copy.byteswap()
    return copy.tobytes()


class RefcountBlock:
    """One refcount block: `entries` counters of `bits` bits each."""

    def __init__(self, data: bytes, refcount_order: int) -> None:
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1
        self.entries = len(data) * 8 // self.bits
        if self.bits >= 8:
            self._values = array(_TYPECODES[self.bits])
            self._values.frombytes(data)
            if not _BIG_ENDIAN_HOST and self.bits > 8:
                self._values.byteswap()
            self._packed = None
        else:
            self._values = None
            self._packed = bytearray(data)
            self._per_byte = 8 // self.bits

    def get(self, index: int) -> int:
        if self._values is not None:
            return self._values[index]
        byte, slot = divmod(index, self._per_byte)
        return (self._packed[byte] >> (slot * self.bits)) & self.max

    def set(self, index: int, value: int) -> None:
        if not 0 <= value <= self.max:
            raise OverflowError(f"refcount {value} does not fit in {self.bits} bits")
        if self._values is not None:
            self._values[index] = value
            return
        byte, slot = divmod(index, self._per_byte)
        shift = slot * self.bits
        self._packed[byte] = (self._packed[byte] & ~(self.max << shift) & 0xFF) | (value << shift)

    def find_zero(self, start: int, end: int) -> int | None:
        """The first index in [start, end) whose refcount is 0."""
        if self._values is not None:
            try:
                return self._values.index(0, start, end)
            except ValueError:
                return None
        return next((i for i in range(start, end) if not self.get(i)), None)

    def values(self) -> list[int]:
        if self._values is not None:
            return self._values.tolist()
        return [self.get(i) for i in range(self.entries)]

    def to_bytes(self) -> bytes:
        if self._values is None:
            return bytes(self._packed)
        if _BIG_ENDIAN_HOST or self.bits == 8:
            return self._values.tobytes()
        copy = array(self._values.typecode, self._values)
        copy.byteswap()
        return copy.tobytes()
