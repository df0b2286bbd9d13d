"""The PC's pair of 8259A programmable interrupt controllers, and the ELCR.

The master answers ports 0x20-0x21 and takes ISA IRQs 0-7; the slave answers
0xA0-0xA1, takes IRQs 8-15 and is cascaded into the master's IR2. The two
Edge/Level Control Registers at 0x4D0-0x4D1 choose, per IRQ, between edge
and level sensitivity (the PC way; the 8259's own LTIM bit is not used).

What is modelled: the ICW1-ICW4 initialisation sequence, the mask (OCW1),
non-specific/specific EOI with and without rotation, set-priority, automatic
EOI (with rotation), special mask mode, special fully nested mode, the poll
command, reading IRR or ISR (OCW3), and spurious IRQ7/IRQ15 when a request
vanishes before the acknowledge. Not modelled: 8080 (MCS-80) call mode and
buffered mode, which no PC operating system uses.

The model is a plain state machine and is not thread-safe on its own: the
interrupt router (devices/interrupts.py) serialises every access with its
lock. `notify` is called whenever the pair's INT output may have risen, so the
router can wake a halted vCPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from devices.log_once import LogOnce
from vmm.layout import PIC_CASCADE_IRQ

log = logging.getLogger(__name__)

SPURIOUS_IRQ = 7  # what a chip answers when the request vanished before INTA

# ELCR bits that can be set: IRQ0 (PIT), IRQ1 (keyboard), IRQ2 (cascade),
# IRQ8 (RTC) and IRQ13 (FPU) are always edge-triggered on a PC.
MASTER_ELCR_MASK = 0xF8
SLAVE_ELCR_MASK = 0xDE

# Initialisation: which ICW the chip expects next on its odd port.
_READY, _WANT_ICW2, _WANT_ICW3, _WANT_ICW4 = range(4)


class Pic8259:
    """One 8259A chip. Offsets: 0 = command/status, 1 = data (mask, ICW2-4)."""

    def __init__(self, name: str, is_master: bool, elcr_mask: int, on_change: Callable[[], None]) -> None:
        self.name = name
        self.is_master = is_master
        self.elcr_mask = elcr_mask
        self.elcr = 0
        self._on_change = on_change
        self._odd = LogOnce(log, f"8259 {name}")
        self.input_levels = 0  # what each IR pin is driven to, for edge detection
        self.vector_base = 0
        self._reset()
        # There is no BIOS to initialise the chips, so power up the way firmware
        # leaves them: everything masked. Otherwise a device interrupt before the
        # OS programs the 8259 would arrive on vector base 0, an exception vector.
        self.imr = 0xFF

    def _reset(self) -> None:
        """What ICW1 does: clear masks and requests, IR0 highest priority, read IRR."""
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.lowest_priority_irq = 7  # IR7 lowest, so IR0 highest
        self.read_isr = False
        self.poll_pending = False
        self.special_mask = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.init_step = _READY
        self._needs_icw4 = False
        self._single = False

    # -- inputs ------------------------------------------------------------------

    def set_input(self, irq: int, high: bool) -> None:
        bit = 1 << irq
        was_high = bool(self.input_levels & bit)
        if high:
            self.input_levels |= bit
        else:
            self.input_levels &= ~bit
        if self.elcr & bit:
            # Level-sensitive: the request follows the line.
            if high:
                self.irr |= bit
            else:
                self.irr &= ~bit
        elif high and not was_high:
            # Edge-sensitive: a rising edge latches a request that stays until INTA,
            # even if the line drops again (which is what a pulse does).
            self.irr |= bit

    def set_cascade(self, high: bool) -> None:
        """Master only: IR2 mirrors the slave's INT output (a level, re-evaluated on every change)."""
        bit = 1 << PIC_CASCADE_IRQ
        if high:
            self.irr |= bit
        else:
            self.irr &= ~bit

    # -- priority resolution -----------------------------------------------------

    def _rank(self, irq: int) -> int:
        """0 is the highest priority; the IRQ after the lowest-priority one ranks first."""
        return (irq - self.lowest_priority_irq - 1) & 7

    def _highest(self, bits: int) -> int | None:
        """The highest-priority IRQ among `bits`, or None."""
        bits &= 0xFF
        if not bits:
            return None
        # Rotate so that bit 0 is the highest-priority IRQ, then take the lowest set bit.
        first = (self.lowest_priority_irq + 1) & 7
        ranked = ((bits >> first) | (bits << (8 - first))) & 0xFF
        return ((ranked & -ranked).bit_length() - 1 + first) & 7

    def pending_irq(self) -> int | None:
        """The IRQ this chip would signal on INT now, or None."""
        request = self._highest(self.irr & ~self.imr)
        if request is None:
            return None
        in_service = self.isr
        if self.special_mask:
            # Special mask mode: masked in-service levels do not block lower ones.
            in_service &= ~self.imr
        if self.is_master and self.special_fully_nested:
            # The slave may interrupt its own in-service request through IR2.
            in_service &= ~(1 << PIC_CASCADE_IRQ)
        blocking = self._highest(in_service)
        if blocking is None or self._rank(request) < self._rank(blocking):
            return request
        return None

    def acknowledge(self, irq: int) -> None:
        """The INTA cycle for `irq`: move it from IRR to ISR (or not, with automatic EOI)."""
        bit = 1 << irq
        if not (self.elcr & bit) and not (self.is_master and irq == PIC_CASCADE_IRQ):
            self.irr &= ~bit
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.lowest_priority_irq = irq
        else:
            self.isr |= bit

    # -- the guest's view --------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset & 1:
            return self.imr
        if self.poll_pending:
            self.poll_pending = False
            return self._poll()
        return self.isr if self.read_isr else self.irr

    def _poll(self) -> int:
        """The poll command: acknowledge without a vector, report 0x80 | irq."""
        irq = self.pending_irq()
        if irq is None:
            return 0
        self.acknowledge(irq)
        self._on_change()
        return 0x80 | irq

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        elif value & 0x10:
            self._icw1(value)
        elif value & 0x08:
            self._ocw3(value)
        else:
            self._ocw2(value)
        self._on_change()

    def _icw1(self, value: int) -> None:
        self._reset()
        self._needs_icw4 = bool(value & 0x01)
        self._single = bool(value & 0x02)
        if value & 0x08:
            self._odd("ltim", "ICW1 level-triggered mode (LTIM) ignored; the ELCR decides")
        self.init_step = _WANT_ICW2

    def _write_data(self, value: int) -> None:
        if self.init_step == _WANT_ICW2:
            self.vector_base = value & 0xF8
            if not self._single:
                self.init_step = _WANT_ICW3
            else:
                self.init_step = _WANT_ICW4 if self._needs_icw4 else _READY
        elif self.init_step == _WANT_ICW3:
            # Which IR carries the slave (master) or our cascade id (slave): the PC
            # wiring is fixed, so the value is accepted and not needed.
            self.init_step = _WANT_ICW4 if self._needs_icw4 else _READY
        elif self.init_step == _WANT_ICW4:
            if not value & 0x01:
                self._odd("mcs80", "ICW4 8080 mode ignored; x86 mode used")
            self.auto_eoi = bool(value & 0x02)
            self.special_fully_nested = bool(value & 0x10)
            self.init_step = _READY
        else:
            self.imr = value

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        level = value & 7
        if command in (0b001, 0b101):  # non-specific EOI, optionally rotating
            irq = self._highest(self.isr)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if command == 0b101:
                    self.lowest_priority_irq = irq
        elif command in (0b011, 0b111):  # specific EOI, optionally rotating
            self.isr &= ~(1 << level)
            if command == 0b111:
                self.lowest_priority_irq = level
        elif command == 0b110:  # set priority: `level` becomes the lowest
            self.lowest_priority_irq = level
        elif command == 0b100:
            self.rotate_on_auto_eoi = True
        elif command == 0b000:
            self.rotate_on_auto_eoi = False
        # 0b010 is a no-op.

    def _ocw3(self, value: int) -> None:
        if value & 0x04:
            self.poll_pending = True
        if value & 0x02:
            self.read_isr = bool(value & 0x01)
        if value & 0x40:
            self.special_mask = bool(value & 0x20)


class ElcrPorts:
    """Ports 0x4D0 (master) and 0x4D1 (slave): one trigger-mode bit per IRQ, 1 = level."""

    def __init__(self, pair: PicPair) -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        chips = (self._pair.master, self._pair.slave)
        value = 0
        for i in range(min(size, 2 - offset) if 0 <= offset < 2 else 0):
            value |= chips[offset + i].elcr << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        chips = (self._pair.master, self._pair.slave)
        for i in range(min(size, 2 - offset) if 0 <= offset < 2 else 0):
            chip = chips[offset + i]
            chip.elcr = (value >> (8 * i)) & chip.elcr_mask
        self._pair.update()


class PicPair:
    """Master and slave 8259A wired as on a PC, with the ELCR.

    Register `master` at 0x20, `slave` at 0xA0 (2 ports each) and `elcr` at
    0x4D0 (2 ports). Drive inputs with `set_irq`, ask `has_interrupt` whether
    INT is raised and run the INTA cycle with `acknowledge`.
    """

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self._notify = notify or (lambda: None)
        self.master = Pic8259("master", True, MASTER_ELCR_MASK, self.update)
        self.slave = Pic8259("slave", False, SLAVE_ELCR_MASK, self.update)
        self.elcr = ElcrPorts(self)
        self._int_output = False

    def set_irq(self, irq: int, high: bool) -> None:
        """Drive ISA IRQ `irq` (0-15). IRQ2 is the cascade and has no device."""
        if irq == PIC_CASCADE_IRQ or not 0 <= irq < 16:
            raise ValueError(f"ISA IRQ {irq} cannot be driven on the 8259 pair")
        chip = self.master if irq < 8 else self.slave
        chip.set_input(irq & 7, high)
        self.update()

    def update(self) -> None:
        """Re-evaluate the cascade and the INT output after any change."""
        self.master.set_cascade(self.slave.pending_irq() is not None)
        raised = self.master.pending_irq() is not None
        if raised and not self._int_output:
            self._notify()
        self._int_output = raised

    def has_interrupt(self) -> bool:
        return self.master.pending_irq() is not None

    def acknowledge(self) -> int:
        """The INTA cycle: return the vector and mark it in service.

        If no request is pending any more, the master answers with its IR7
        vector (or the slave with IR15 when the master chose the cascade)
        without setting ISR: a spurious interrupt, as on real hardware.
        """
        irq = self.master.pending_irq()
        if irq is None:
            return self.master.vector_base + SPURIOUS_IRQ
        self.master.acknowledge(irq)
        if irq == PIC_CASCADE_IRQ:
            slave_irq = self.slave.pending_irq()
            if slave_irq is None:
                vector = self.slave.vector_base + SPURIOUS_IRQ
            else:
                self.slave.acknowledge(slave_irq)
                vector = self.slave.vector_base + slave_irq
        else:
            vector = self.master.vector_base + irq
        self.update()
        return vector


# Where the pair sits (when emulated: KVM's in-kernel pair answers these itself).
MASTER_PORT = 0x20  # 2 ports
SLAVE_PORT = 0xA0  # 2 ports
ELCR_PORT = 0x4D0  # 2 ports: master, slave
