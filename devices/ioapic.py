"""The 82093AA I/O APIC at 0xFEC00000: 24 interrupt pins routed to local APICs.

The guest selects a register by writing its index to IOREGSEL (offset 0x00)
and reads or writes it through IOWIN (offset 0x10). Registers: 0x00 ID,
0x01 version (0x20, as QEMU reports, with 24 entries), 0x02 arbitration ID,
and 0x10 + 2n / 0x11 + 2n the low and high halves of redirection entry n.
Version 0x20 also has the EOI register at offset 0x40, which Linux uses to
clear a stale remote IRR.

Each redirection entry names a vector, a delivery mode, a destination
(physical APIC ID or logical mask), a trigger mode and a mask. An
edge-triggered pin sends one message per rising edge while unmasked (an edge
on a masked pin is lost, as on hardware). A level-triggered pin sends a
message when asserted and sets remote IRR; it sends nothing more until the
local APIC's EOI for that vector comes back (`eoi(vector)`), and then
re-sends if the line is still asserted. Unmasking an asserted level pin sends
at once. Pin polarity is recorded but not applied: `set_level(pin, True)`
always means "asserted", whatever the wire level would be.

Messages leave through the injected `deliver` callable (the APIC bus). The
model is not thread-safe on its own; the interrupt router holds its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from devices.lapic import EXTINT, FIXED, INIT, LOWEST_PRIORITY, NMI, STARTUP, ApicMessage
from devices.log_once import LogOnce
from vmm.layout import IOAPIC_PINS

log = logging.getLogger(__name__)

VERSION = 0x20

REG_SELECT = 0x00
REG_WINDOW = 0x10
REG_EOI = 0x40

_ID, _VERSION, _ARBITRATION = 0x00, 0x01, 0x02
_FIRST_REDIRECTION = 0x10

ENTRY_MASKED = 1 << 16
ENTRY_LEVEL = 1 << 15
ENTRY_REMOTE_IRR = 1 << 14
ENTRY_DELIVERY_STATUS = 1 << 12
ENTRY_LOGICAL = 1 << 11
_READ_ONLY = ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS
_LOW_WRITABLE = 0x1_FFFF & ~_READ_ONLY  # vector, mode, dest mode, polarity, trigger, mask


class IoApic:
    def __init__(self, deliver: Callable[[ApicMessage], object], ioapic_id: int = 0) -> None:
        self._deliver = deliver
        self.ioapic_id = ioapic_id & 0xF
        self.select = 0
        self.redirection = [ENTRY_MASKED] * IOAPIC_PINS  # 64-bit entries, all masked at reset
        self.asserted = 0  # bit n: pin n is asserted
        self._odd = LogOnce(log, "I/O APIC")

    # -- pins --------------------------------------------------------------------

    def set_level(self, pin: int, high: bool) -> None:
        if not 0 <= pin < IOAPIC_PINS:
            raise ValueError(f"I/O APIC pin {pin} out of range")
        bit = 1 << pin
        was_high = bool(self.asserted & bit)
        if high:
            self.asserted |= bit
        else:
            self.asserted &= ~bit
        if self.redirection[pin] & ENTRY_LEVEL:
            self._service(pin)
        elif high and not was_high:
            self._send(pin)

    def eoi(self, vector: int) -> None:
        """A local APIC ended level-triggered `vector`: clear remote IRR and re-check the pins."""
        for pin, entry in enumerate(self.redirection):
            if entry & 0xFF == vector and entry & ENTRY_LEVEL and entry & ENTRY_REMOTE_IRR:
                self.redirection[pin] = entry & ~ENTRY_REMOTE_IRR
                self._service(pin)

    def _service(self, pin: int) -> None:
        """Level-triggered pins: send if asserted, unmasked and not already waiting for EOI."""
        entry = self.redirection[pin]
        if entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR) or not self.asserted & (1 << pin):
            return
        self.redirection[pin] = entry | ENTRY_REMOTE_IRR
        self._send(pin)

    def _send(self, pin: int) -> None:
        entry = self.redirection[pin]
        if entry & ENTRY_MASKED:
            return
        mode = (entry >> 8) & 7
        if mode not in (FIXED, LOWEST_PRIORITY, NMI, INIT, STARTUP):
            if mode == EXTINT:
                self._odd("extint", "pin %d in ExtINT mode not supported; interrupt dropped", pin)
            else:
                self._odd(f"mode{mode}", "pin %d delivery mode %d not supported; dropped", pin, mode)
            return
        self._deliver(
            ApicMessage(
                vector=entry & 0xFF,
                delivery_mode=mode,
                destination=(entry >> 56) & 0xFF,
                logical=bool(entry & ENTRY_LOGICAL),
                level_triggered=bool(entry & ENTRY_LEVEL),
            )
        )

    # -- MMIO --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == REG_SELECT:
            return self.select
        if offset == REG_WINDOW:
            return self._read_register(self.select) & ((1 << (8 * min(size, 4))) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == REG_SELECT:
            self.select = value & 0xFF
        elif offset == REG_WINDOW:
            if size != 4:
                self._odd("size", "%d-byte write to IOWIN ignored", size)
                return
            self._write_register(self.select, value & 0xFFFF_FFFF)
        elif offset == REG_EOI:
            self.eoi(value & 0xFF)

    def _read_register(self, index: int) -> int:
        if index in (_ID, _ARBITRATION):
            return self.ioapic_id << 24
        if index == _VERSION:
            return (IOAPIC_PINS - 1) << 16 | VERSION
        pin, high = divmod(index - _FIRST_REDIRECTION, 2)
        if index >= _FIRST_REDIRECTION and pin < IOAPIC_PINS:
            return (self.redirection[pin] >> (32 * high)) & 0xFFFF_FFFF
        return 0  # reserved registers read as zero

    def _write_register(self, index: int, value: int) -> None:
        if index == _ID:
            self.ioapic_id = (value >> 24) & 0xF
            return
        pin, high = divmod(index - _FIRST_REDIRECTION, 2)
        if index < _FIRST_REDIRECTION or pin >= IOAPIC_PINS:
            return  # version, arbitration and reserved registers are read-only
        entry = self.redirection[pin]
        if high:
            entry = (entry & 0xFFFF_FFFF) | (value & 0xFF00_0000) << 32
        else:
            entry = (entry & ~0xFFFF_FFFF) | (entry & _READ_ONLY) | (value & _LOW_WRITABLE)
            if not entry & ENTRY_LEVEL:
                entry &= ~ENTRY_REMOTE_IRR  # remote IRR only means something for level pins
        self.redirection[pin] = entry
        if entry & ENTRY_LEVEL:
            self._service(pin)


WINDOW_SIZE = 0x1000  # at layout.IOAPIC_BASE, where the MADT says it is
