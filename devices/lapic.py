"""The xAPIC local interrupt controller, one per vCPU, at 0xFEE00000.

Each `LocalApic` holds one CPU's interrupt state: the 256-bit request (IRR),
in-service (ISR) and trigger-mode (TMR) registers, the task and processor
priorities, the local vector table (timer, thermal, performance counter,
LINT0, LINT1, error), the timer, the error status and the interrupt command
register through which the CPU sends IPIs. The APIC ID equals the vCPU
index. Version 0x14 with six LVT entries, as KVM reports; no EOI-broadcast
suppression, no x2APIC, and no TSC-deadline timer mode (the mode bit is not
writable, so CPUID must not advertise TSC-deadline either).

`ApicBus` is the wire between the APICs: it resolves an `ApicMessage`'s
destination (physical ID or broadcast, logical flat or cluster model, or a
shorthand) to local APICs and hands the message to each. Both IPIs from the
ICR and I/O APIC redirections travel over it.

The timer counts at `bus_hz` (1 GHz by default, as KVM and QEMU use) divided
by the divide configuration. Nothing ticks: the current count is computed
from the clock when read, `next_deadline()` tells the scheduler when the next
timer interrupt is due, and `update(now)` delivers it. A periodic timer fires
at most every 200 us (KVM's lower bound), so a guest cannot make the VMM spin.

The model is not thread-safe on its own; the interrupt router holds its lock
around every call. Everything the APIC must tell the outside world (an IPI
to send, an EOI to broadcast to the I/O APIC, an interrupt now pending, an
INIT or SIPI received) goes through the injected `LapicHost`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from devices.log_once import LogOnce
from vmm.layout import LAPIC_BASE

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
DEFAULT_BUS_HZ = 1_000_000_000
MIN_PERIODIC_NS = 200_000

# Delivery modes (ICR, LVT and I/O APIC redirection bits 10-8).
DELIVERY_MODE_SHIFT = 8
DELIVERY_MODE_MASK = 7 << DELIVERY_MODE_SHIFT
FIXED = 0
LOWEST_PRIORITY = 1
SMI = 2
NMI = 4
INIT = 5
STARTUP = 6
EXTINT = 7

# Destination shorthands (ICR bits 19-18).
NO_SHORTHAND, SELF, ALL_INCLUDING_SELF, ALL_EXCLUDING_SELF = range(4)
BROADCAST = 0xFF

# Register offsets in the 4 KiB page.
REG_ID = 0x20
REG_VERSION = 0x30
REG_TPR = 0x80
REG_APR = 0x90
REG_PPR = 0xA0
REG_EOI = 0xB0
REG_RRD = 0xC0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

VERSION = 0x0005_0014  # xAPIC version 0x14; bits 23-16: six LVT entries minus one

LVT_MASKED = 1 << 16
LVT_PERIODIC = 1 << 17
# LINT0 as ExtINT and LINT1 as NMI: the virtual-wire setup a PC BIOS leaves on the
# BSP; Lapic.set_firmware_defaults on the software CPU, vmm/kvm/firmware_state.py on KVM.
VIRTUAL_WIRE_LINT = ((REG_LVT_LINT0, EXTINT), (REG_LVT_LINT1, NMI))
LVT_REGISTERS = (REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR)
_LVT_WRITABLE = {
    REG_LVT_TIMER: 0xFF | LVT_MASKED | LVT_PERIODIC,  # bit 18 (TSC-deadline) stays 0
    REG_LVT_THERMAL: 0x7FF | LVT_MASKED,
    REG_LVT_PERF: 0x7FF | LVT_MASKED,
    REG_LVT_LINT0: 0x7FF | 0x2000 | 0x8000 | LVT_MASKED,  # + input polarity, trigger mode
    REG_LVT_LINT1: 0x7FF | 0x2000 | 0x8000 | LVT_MASKED,
    REG_LVT_ERROR: 0xFF | LVT_MASKED,
}

SVR_ENABLE = 1 << 8
_SVR_WRITABLE = 0x3FF  # vector, software enable, focus checking; no EOI-broadcast suppression

# Error status register bits.
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# IA32_APIC_BASE MSR (0x1B) bits.
APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10
APIC_BASE_ENABLE = 1 << 11

_ICR_DELIVERY_STATUS = 1 << 12
_ICR_LOW_WRITABLE = 0x000C_CFFF  # vector, mode, dest mode, level, trigger, shorthand


# Registers that read back an attribute as it is (the ID shifted into bits 31-24).
_PLAIN_REGISTERS = {
    REG_ID: "apic_id",
    REG_TPR: "tpr",
    REG_LDR: "ldr",
    REG_DFR: "dfr",
    REG_SVR: "svr",
    REG_ESR: "esr",
    REG_ICR_LOW: "icr_low",
    REG_ICR_HIGH: "icr_high",
    REG_TIMER_INITIAL: "timer_initial",
    REG_TIMER_DIVIDE: "timer_divide_config",
}


class ApicMessage(NamedTuple):
    """An interrupt message on the APIC bus, from an ICR write or an I/O APIC pin."""

    vector: int
    delivery_mode: int = FIXED
    destination: int = 0
    logical: bool = False
    level_triggered: bool = False
    assert_level: bool = True  # ICR bit 14; clear with level trigger = INIT de-assert
    shorthand: int = NO_SHORTHAND
    source: int | None = None  # the sending vCPU, for SELF and ALL_EXCLUDING_SELF


class LapicHost(Protocol):
    """What a local APIC needs from the platform around it."""

    def send(self, message: ApicMessage) -> None:
        """Put an IPI on the APIC bus."""

    def eoi_broadcast(self, vector: int) -> None:
        """The guest ended a level-triggered interrupt: the I/O APIC clears remote IRR."""

    def interrupt_pending(self, cpu: int) -> None:
        """Something became deliverable to `cpu` (a vector, an NMI): wake it if it sleeps."""

    def init_received(self, cpu: int) -> None:
        """`cpu` got INIT: its APIC is reset; the vCPU must reset and wait for SIPI."""

    def sipi_received(self, cpu: int, vector: int) -> None:
        """`cpu`, waiting for SIPI, got one: start it in real mode at vector << 12."""


class NullLapicHost:
    """Records what a local APIC tells the platform; for tests and single APICs."""

    def __init__(self) -> None:
        self.sent: list[ApicMessage] = []
        self.eois: list[int] = []
        self.pending: list[int] = []
        self.inits: list[int] = []
        self.sipis: list[tuple[int, int]] = []

    def send(self, message: ApicMessage) -> None:
        self.sent.append(message)

    def eoi_broadcast(self, vector: int) -> None:
        self.eois.append(vector)

    def interrupt_pending(self, cpu: int) -> None:
        self.pending.append(cpu)

    def init_received(self, cpu: int) -> None:
        self.inits.append(cpu)

    def sipi_received(self, cpu: int, vector: int) -> None:
        self.sipis.append((cpu, vector))


def _highest(bits: int) -> int:
    return bits.bit_length() - 1  # -1 when empty


class LocalApic:
    def __init__(
        self,
        index: int,
        host: LapicHost,
        clock: Callable[[], int] = time.monotonic_ns,
        bus_hz: int = DEFAULT_BUS_HZ,
    ) -> None:
        if not 0 <= index < BROADCAST:
            raise ValueError(f"local APIC index {index} out of range")
        self.index = index
        self.is_bsp = index == 0
        self.apic_id = index
        self.hardware_enabled = True
        self._host = host
        self._clock = clock
        self._bus_hz = bus_hz
        self._odd = LogOnce(log, f"local APIC {index}")
        # After reset the BSP runs and the other CPUs wait for INIT/SIPI.
        self.waiting_for_sipi = not self.is_bsp
        self._reset_registers()

    def _reset_registers(self) -> None:
        """The power-up/INIT state of everything but the ID and the APIC base MSR."""
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFF_FFFF
        self.svr = 0xFF
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr_low = 0
        self.icr_high = 0
        self.lvt = {reg: LVT_MASKED for reg in LVT_REGISTERS}
        self.timer_initial = 0
        self.timer_divide_config = 0
        self._timer_start: int | None = None
        self._timer_deadline: int | None = None
        self.nmi_pending = False

    def set_firmware_defaults(self) -> None:
        """LINT0 as ExtINT and LINT1 as NMI, the virtual-wire setup a PC BIOS leaves on
        the BSP (KVM and Firecracker do the same), so 8259 interrupts reach the BSP
        before the OS programs its APIC."""
        for register, mode in VIRTUAL_WIRE_LINT:
            self.lvt[register] = mode << DELIVERY_MODE_SHIFT

    # -- derived state -----------------------------------------------------------

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def ppr(self) -> int:
        in_service = max(_highest(self.isr), 0)
        if (self.tpr >> 4) >= (in_service >> 4):
            return self.tpr
        return in_service & 0xF0

    def highest_deliverable(self) -> int | None:
        """The vector the CPU would take now if its interrupt flag allows, or None."""
        vector = _highest(self.irr)
        if vector >= 0 and (vector >> 4) > (self.ppr >> 4):
            return vector
        return None

    def acknowledge(self) -> int | None:
        """The CPU takes the highest deliverable vector: IRR -> ISR. None if none is deliverable."""
        vector = self.highest_deliverable()
        if vector is None:
            return None
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        return vector

    def accepts_pic_interrupts(self) -> bool:
        """Whether the 8259's INT output reaches this CPU: through LINT0 in ExtINT mode,
        or straight to the BSP's INTR pin when its APIC is hardware-disabled."""
        if not self.hardware_enabled:
            return self.is_bsp
        lint0 = self.lvt[REG_LVT_LINT0]
        return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == EXTINT

    def take_nmi(self) -> bool:
        pending, self.nmi_pending = self.nmi_pending, False
        return pending

    # -- destination matching and acceptance --------------------------------------

    def matches(self, destination: int, logical: bool) -> bool:
        if not self.hardware_enabled:
            return False
        if destination == BROADCAST:
            return True
        if not logical:
            return destination == self.apic_id
        logical_id = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: one bit per CPU
            return bool(logical_id & destination)
        # Cluster model: high nibble selects the cluster, low nibble the CPUs in it.
        return logical_id >> 4 == destination >> 4 and bool(logical_id & destination & 0xF)

    def accept(self, delivery_mode: int, vector: int, level_triggered: bool) -> None:
        """A message for this APIC arrived over the bus or from its own LVT."""
        if delivery_mode in (FIXED, LOWEST_PRIORITY):
            if not self.software_enabled:
                return  # a software-disabled APIC drops fixed interrupts
            if vector < 16:
                self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
                return
            bit = 1 << vector
            self.irr |= bit
            if level_triggered:
                self.tmr |= bit
            else:
                self.tmr &= ~bit
            self._host.interrupt_pending(self.index)
        elif delivery_mode == NMI:
            self.nmi_pending = True
            self._host.interrupt_pending(self.index)
        elif delivery_mode == INIT:
            self._reset_registers()
            self.waiting_for_sipi = not self.is_bsp
            self._host.init_received(self.index)
        elif delivery_mode == STARTUP:
            if self.waiting_for_sipi:
                self.waiting_for_sipi = False
                self._host.sipi_received(self.index, vector)
            # A SIPI to a running CPU is ignored: Linux sends two, and the second
            # arrives when the AP is already up.
        else:
            self._odd(f"mode{delivery_mode}", "delivery mode %d not supported; message dropped", delivery_mode)

    def lint1(self) -> None:
        """The LINT1 pin is asserted (an NMI button, say)."""
        self._local_interrupt(REG_LVT_LINT1)

    def _local_interrupt(self, reg: int) -> None:
        entry = self.lvt[reg]
        if entry & LVT_MASKED:
            return
        mode = (entry >> 8) & 7 if reg in (REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_PERF, REG_LVT_THERMAL) else FIXED
        level = reg in (REG_LVT_LINT0, REG_LVT_LINT1) and bool(entry & 0x8000)
        self.accept(mode, entry & 0xFF, level)

    def _error(self, bit: int) -> None:
        if self._esr_pending & bit:
            return  # already reported; also stops an illegal error vector from recursing
        self._esr_pending |= bit
        self._local_interrupt(REG_LVT_ERROR)

    # -- timer -------------------------------------------------------------------

    @property
    def timer_divisor(self) -> int:
        code = (self.timer_divide_config & 3) | ((self.timer_divide_config & 8) >> 1)
        return 1 << ((code + 1) & 7)

    def _timer_elapsed_ticks(self, now: int) -> int:
        assert self._timer_start is not None
        return (now - self._timer_start) * self._bus_hz // (NS_PER_S * self.timer_divisor)

    def _ticks_to_ns(self, ticks: int) -> int:
        return -(-ticks * self.timer_divisor * NS_PER_S // self._bus_hz)

    def current_count(self, now: int) -> int:
        if self._timer_start is None or self.timer_initial == 0:
            return 0
        elapsed = self._timer_elapsed_ticks(now)
        if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
            return self.timer_initial - elapsed % self.timer_initial
        return max(self.timer_initial - elapsed, 0)

    def next_deadline(self) -> int | None:
        """Clock time of the next timer interrupt, or None."""
        return self._timer_deadline

    def update(self, now: int | None = None) -> None:
        """Deliver the timer interrupt if it is due; periods missed meanwhile coalesce."""
        if now is None:
            now = self._clock()
        if self._timer_deadline is None or now < self._timer_deadline:
            return
        self._local_interrupt(REG_LVT_TIMER)
        if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
            self._arm_timer(now)
        else:
            self._timer_deadline = None

    def _arm_timer(self, now: int) -> None:
        """Recompute the deadline after any change to the timer's registers."""
        self._timer_deadline = None
        if self._timer_start is None or self.timer_initial == 0 or self.lvt[REG_LVT_TIMER] & LVT_MASKED:
            return  # a masked timer still counts (reads see it), but raises nothing
        period = self._ticks_to_ns(self.timer_initial)
        if self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
            period = max(period, MIN_PERIODIC_NS)
            periods_done = (now - self._timer_start) // period
            self._timer_deadline = self._timer_start + (periods_done + 1) * period
        elif self._timer_start + period > now:
            self._timer_deadline = self._timer_start + period
        # A one-shot that expired while masked is lost, as on hardware.

    def _set_divide(self, value: int, now: int) -> None:
        # Keep the current count continuous across the change, then count at the new rate.
        if self._timer_start is not None and self.timer_initial:
            remaining = self.current_count(now)
            self.timer_divide_config = value
            if remaining == 0 and not self.lvt[REG_LVT_TIMER] & LVT_PERIODIC:
                return
            self._timer_start = now - self._ticks_to_ns(self.timer_initial - remaining)
        else:
            self.timer_divide_config = value

    # -- IPIs --------------------------------------------------------------------

    def _send_ipi(self) -> None:
        low = self.icr_low
        vector = low & 0xFF
        mode = (low >> 8) & 7
        level_triggered = bool(low & (1 << 15))
        assert_level = bool(low & (1 << 14))
        if mode == INIT and level_triggered and not assert_level:
            return  # INIT level de-assert: a no-op since the Pentium 4
        if mode in (SMI, 3, EXTINT):
            self._odd(f"icr{mode}", "ICR delivery mode %d not supported; IPI dropped", mode)
            return
        if mode in (FIXED, LOWEST_PRIORITY) and vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)
            return
        self._host.send(
            ApicMessage(
                vector=vector,
                delivery_mode=mode,
                destination=self.icr_high >> 24,
                logical=bool(low & (1 << 11)),
                level_triggered=level_triggered,
                assert_level=assert_level,
                shorthand=(low >> 18) & 3,
                source=self.index,
            )
        )

    # -- the MSR -----------------------------------------------------------------

    def apic_base_msr(self) -> int:
        value = LAPIC_BASE
        if self.is_bsp:
            value |= APIC_BASE_BSP
        if self.hardware_enabled:
            value |= APIC_BASE_ENABLE
        return value

    def set_apic_base_msr(self, value: int) -> None:
        if value & ~0xFFF != LAPIC_BASE:
            self._odd("relocate", "APIC base relocation to %#x not supported", value & ~0xFFF)
        if value & APIC_BASE_X2APIC:
            self._odd("x2apic", "x2APIC mode requested but not offered; ignored")
        enable = bool(value & APIC_BASE_ENABLE)
        if not enable and self.hardware_enabled:
            self._reset_registers()
        self.hardware_enabled = enable

    # -- MMIO --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        now = self._clock()
        self.update(now)
        register = offset & 0xFF0
        value = self._read_register(register, now)
        if value is None:
            self._error(ESR_ILLEGAL_REGISTER)
            return 0
        shift = 8 * (offset & 0xF)
        return (value >> shift) & ((1 << (8 * size)) - 1) if shift < 32 else 0

    def _read_register(self, reg: int, now: int) -> int | None:
        if REG_ISR <= reg < REG_ESR:
            bank, word = divmod(reg - REG_ISR, 0x80)
            bits = (self.isr, self.tmr, self.irr)[bank]
            return (bits >> (32 * (word >> 4))) & 0xFFFF_FFFF
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == REG_TIMER_CURRENT:
            return self.current_count(now)
        if reg == REG_PPR:
            return self.ppr
        if reg in (REG_VERSION, REG_APR, REG_EOI, REG_RRD):
            return VERSION if reg == REG_VERSION else 0
        attribute = _PLAIN_REGISTERS.get(reg)
        if attribute is None:
            return None
        value: int = getattr(self, attribute)
        return value << 24 if reg == REG_ID else value

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 0xF:
            self._odd("partial", "%d-byte write at offset %#x ignored (registers are 32-bit)", size, offset)
            return
        now = self._clock()
        self.update(now)
        value &= 0xFFFF_FFFF
        reg = offset & 0xFF0
        if reg == REG_ID:
            self.apic_id = value >> 24
        elif reg == REG_TPR:
            self.tpr = value & 0xFF
            self._notify_if_deliverable()
        elif reg == REG_EOI:
            self._eoi()
        elif reg == REG_LDR:
            self.ldr = value & 0xFF00_0000
        elif reg == REG_DFR:
            self.dfr = value | 0x0FFF_FFFF
        elif reg == REG_SVR:
            self._write_svr(value, now)
        elif reg == REG_ESR:
            self.esr, self._esr_pending = self._esr_pending, 0
        elif reg == REG_ICR_LOW:
            self.icr_low = value & _ICR_LOW_WRITABLE & ~_ICR_DELIVERY_STATUS
            self._send_ipi()
        elif reg == REG_ICR_HIGH:
            self.icr_high = value & 0xFF00_0000
        elif reg in self.lvt:
            if not self.software_enabled:
                value |= LVT_MASKED  # the mask cannot be cleared while the APIC is disabled
            self.lvt[reg] = value & _LVT_WRITABLE[reg]
            if reg == REG_LVT_TIMER:
                self._arm_timer(now)
        elif reg == REG_TIMER_INITIAL:
            self.timer_initial = value
            self._timer_start = now
            self._arm_timer(now)
        elif reg == REG_TIMER_DIVIDE:
            self._set_divide(value & 0xB, now)
            self._arm_timer(now)
        elif reg in (REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_TIMER_CURRENT) or REG_ISR <= reg < REG_ESR:
            pass  # read-only
        else:
            self._error(ESR_ILLEGAL_REGISTER)

    def _write_svr(self, value: int, now: int) -> None:
        self.svr = value & _SVR_WRITABLE
        if not self.software_enabled:
            for reg in LVT_REGISTERS:
                self.lvt[reg] |= LVT_MASKED
            self._arm_timer(now)

    def _eoi(self) -> None:
        vector = _highest(self.isr)
        if vector < 0:
            return  # EOI with nothing in service: ignored
        self.isr &= ~(1 << vector)
        if self.tmr & (1 << vector):
            self._host.eoi_broadcast(vector)
        self._notify_if_deliverable()

    def _notify_if_deliverable(self) -> None:
        if self.highest_deliverable() is not None:
            self._host.interrupt_pending(self.index)


class ApicBus:
    """Delivers APIC messages to the local APICs their destination names."""

    def __init__(self, lapics: list[LocalApic]) -> None:
        self.lapics = lapics
        self._odd = LogOnce(log, "APIC bus")

    def targets(self, message: ApicMessage) -> list[LocalApic]:
        shorthand = message.shorthand
        if shorthand == SELF:
            return [self.lapics[message.source]] if message.source is not None else []
        if shorthand == ALL_INCLUDING_SELF:
            return [apic for apic in self.lapics if apic.hardware_enabled]
        if shorthand == ALL_EXCLUDING_SELF:
            return [apic for apic in self.lapics if apic.hardware_enabled and apic.index != message.source]
        return [apic for apic in self.lapics if apic.matches(message.destination, message.logical)]

    def deliver(self, message: ApicMessage) -> int:
        """Hand `message` to its destinations; return how many APICs got it."""
        targets = self.targets(message)
        if message.delivery_mode == LOWEST_PRIORITY and len(targets) > 1:
            # The CPU running at the lowest priority takes it; ties go to the lowest ID.
            enabled = [apic for apic in targets if apic.software_enabled] or targets
            targets = [min(enabled, key=lambda apic: (apic.ppr >> 4, apic.apic_id))]
        for apic in targets:
            apic.accept(message.delivery_mode, message.vector, message.level_triggered)
        return len(targets)


WINDOW_SIZE = 0x1000  # at layout.LAPIC_BASE, where the MADT says it is
