"""The PC interrupt platform for an accelerator without an in-kernel irqchip.

KVM brings its own 8259 pair, I/O APIC, local APICs and 8254 PIT
(`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`). The software CPU (vmm/tcg) has
none, so `InterruptRouter` builds them from devices/pic.py, pit.py,
ioapic.py and lapic.py, wires them as on a PC and answers the one question a
CPU asks of them: "is there an interrupt for me, and which vector?".

Wiring, as on a PC (and as QEMU routes GSIs for KVM):
  - ISA IRQ n (0-15, except the cascade IRQ2) drives 8259 input n AND I/O
    APIC pin n, except IRQ0, which is I/O APIC pin 2 (the MADT's
    interrupt source override, vmm/layout.py). GSIs 16-23 reach the I/O APIC only.
  - The 8259's INT output reaches a CPU through its LINT0 in ExtINT mode
    (set on the BSP at reset, as firmware leaves it), or the BSP's INTR pin
    directly when its APIC is hardware-disabled.
  - 8254 channel 0 drives ISA IRQ0; port 0x61 gates channel 2.
  - I/O APIC messages and IPIs travel over one `ApicBus`; a local APIC's EOI
    of a level-triggered vector comes back to the I/O APIC (remote IRR).

How the software CPU (vmm/tcg/vm.py, vcpu.py) uses it: `attach` puts the
controllers on the machine's buses; devices get lines from `irq_line`; before
each slice of guest code a vCPU asks `has_nmi`/`take_nmi` and, when the guest
can take one, `has_interrupt`/`acknowledge`; `next_deadline` bounds a slice or
a halted vCPU's sleep, and `deadline_changes` tells whether a device access
moved it. Every method is thread-safe; `cpu` is a vCPU index, which is also
its APIC ID; times are in the clock's nanoseconds.

The router reports events through callbacks given to the constructor (each
may be None). They run after the router's lock is released, on whichever
thread caused the event (a device thread raising a line, or a vCPU writing
the ICR): `wake()` and `wake_cpu(cpu)` when something became pending (an
interrupt, NMI, INIT or SIPI) for some or for a named vCPU, once per burst;
`on_init(cpu)` after `cpu`'s INIT (its local APIC is already reset);
`on_sipi(cpu, vector)` when `cpu`, waiting for SIPI, got one (start it in
real mode at CS = vector << 8).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from devices import ioapic, lapic, pic, pit
from devices.ioapic import IoApic
from devices.lapic import DEFAULT_BUS_HZ, ApicBus, ApicMessage, LocalApic
from devices.pic import PicPair
from devices.pit import Pit
from vmm import layout
from vmm.bus import Bus, BusDevice, IrqLine

log = logging.getLogger(__name__)

MAX_CPUS = 254  # xAPIC IDs are 8 bits and 0xFF is the broadcast ID
ISA_IRQS = 16


class _Critical:
    """The router's lock, re-entrant, with the callbacks run after the outermost release.

    Running callbacks outside the lock lets them call back into the router
    (a scheduler's `on_init` may reset the vCPU and query the router) and
    keeps a slow callback from holding up a device thread.
    """

    __slots__ = ("_router",)

    def __init__(self, router: InterruptRouter) -> None:
        self._router = router

    def __enter__(self) -> None:
        router = self._router
        router._lock.acquire()
        router._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        router = self._router
        router._depth -= 1
        if router._depth:
            router._lock.release()
            return
        events = router._events
        if events:
            router._events = []
        woken = router._woken
        if woken:
            router._woken = set()
        if router._deadline_dirty:
            router._recompute_deadline()
        router._lock.release()
        for event in events:
            event()
        if woken:
            if router.wake is not None:
                router.wake()
            if router.wake_cpu is not None:
                for cpu in sorted(woken):
                    router.wake_cpu(cpu)


class _Host:
    """What the local APICs see of the platform (devices.lapic.LapicHost)."""

    def __init__(self, router: InterruptRouter) -> None:
        self._router = router

    def send(self, message: ApicMessage) -> None:
        self._router.apic_bus.deliver(message)

    def eoi_broadcast(self, vector: int) -> None:
        self._router.ioapic.eoi(vector)

    def interrupt_pending(self, cpu: int) -> None:
        self._router._woken.add(cpu)

    def init_received(self, cpu: int) -> None:
        router = self._router
        router._deadline_dirty = True  # INIT stopped the APIC timer
        router._woken.add(cpu)
        if router.on_init is not None:
            callback = router.on_init
            router._events.append(lambda: callback(cpu))

    def sipi_received(self, cpu: int, vector: int) -> None:
        router = self._router
        router._woken.add(cpu)
        if router.on_sipi is not None:
            callback = router.on_sipi
            router._events.append(lambda: callback(cpu, vector))


class _Line:
    """One device's connection to a GSI. Several lines on one GSI are wire-ORed.

    `pulse()` on a line its device already holds high does nothing: the pin
    sees no edge, as on a wire.
    """

    __slots__ = ("_router", "gsi", "level")

    def __init__(self, router: InterruptRouter, gsi: int) -> None:
        self._router = router
        self.gsi = gsi
        self.level = False

    def set_level(self, high: bool) -> None:
        router = self._router
        with router._critical:
            if high != self.level:
                self.level = high
                router._drive(self.gsi, 1 if high else -1)

    def pulse(self) -> None:
        router = self._router
        with router._critical:
            if not self.level:
                router._drive(self.gsi, 1)
                router._drive(self.gsi, -1)


class _Guarded:
    """A model's register interface with the router's lock held around each access."""

    __slots__ = ("_router", "_device", "_deadline")

    def __init__(
        self, router: InterruptRouter, device: BusDevice, deadline: Callable[[], int | None] | None = None
    ) -> None:
        self._router = router
        self._device = device
        self._deadline = deadline  # the model's timer, if accesses can move it

    def read(self, offset: int, size: int) -> int:
        router = self._router
        with router._critical:
            if self._deadline is None:
                return self._device.read(offset, size)
            before = self._deadline()
            value = self._device.read(offset, size)
            if self._deadline() != before:
                router._deadline_dirty = True
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        router = self._router
        with router._critical:
            before = self._deadline() if self._deadline is not None else None
            self._device.write(offset, size, value)
            if self._deadline is not None and self._deadline() != before:
                router._deadline_dirty = True


class LapicWindow:
    """The LAPIC page as one bus device: each access goes to the APIC of the vCPU making it."""

    def __init__(self, router: InterruptRouter, current_cpu: Callable[[], int]) -> None:
        self._router = router
        self._current_cpu = current_cpu

    def read(self, offset: int, size: int) -> int:
        return self._router.lapic_read(self._current_cpu(), offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._router.lapic_write(self._current_cpu(), offset, size, value)


class InterruptRouter:
    def __init__(
        self,
        cpus: int = 1,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
        wake: Callable[[], None] | None = None,
        wake_cpu: Callable[[int], None] | None = None,
        on_init: Callable[[int], None] | None = None,
        on_sipi: Callable[[int, int], None] | None = None,
        lapic_bus_hz: int = DEFAULT_BUS_HZ,
    ) -> None:
        if not 1 <= cpus <= MAX_CPUS:
            raise ValueError(f"{cpus} vCPUs: the interrupt platform supports 1 to {MAX_CPUS}")
        self.clock = clock
        self.wake = wake
        self.wake_cpu = wake_cpu
        self.on_init = on_init
        self.on_sipi = on_sipi
        self._lock = threading.RLock()
        self._critical = _Critical(self)
        self._depth = 0
        self._events: list[Callable[[], None]] = []
        self._woken: set[int] = set()  # vCPUs that something became pending for
        self._deadline: int | None = None
        self._deadline_dirty = True
        # Counts changes of next_deadline(): a caller that compares it before and
        # after a device access knows whether the access moved a timer.
        self.deadline_changes = 0
        self._gsi_sources = [0] * layout.IOAPIC_PINS  # asserted lines per GSI

        host = _Host(self)
        self.lapics = [LocalApic(index, host, clock, lapic_bus_hz) for index in range(cpus)]
        self.lapics[0].set_firmware_defaults()
        self.apic_bus = ApicBus(self.lapics)
        self.ioapic = IoApic(self.apic_bus.deliver)
        self.pic = PicPair(notify=self._note_pending)
        self.pit = Pit(self.irq_line(0), clock)

    @property
    def cpus(self) -> int:
        return len(self.lapics)

    # -- wiring ------------------------------------------------------------------

    def irq_line(self, gsi: int) -> IrqLine:
        """A line for a device: ISA IRQ `gsi` for 0-15 (IRQ0 lands on I/O APIC pin 2),
        I/O APIC pin `gsi` for 16-23. Lines on the same GSI are wire-ORed."""
        if gsi == layout.PIC_CASCADE_IRQ or not 0 <= gsi < layout.IOAPIC_PINS:
            raise ValueError(f"no device can be wired to interrupt {gsi}")
        return _Line(self, gsi)

    def _drive(self, gsi: int, delta: int) -> None:
        before = self._gsi_sources[gsi] > 0
        self._gsi_sources[gsi] += delta
        after = self._gsi_sources[gsi] > 0
        if before == after:
            return
        if gsi < ISA_IRQS:
            self.pic.set_irq(gsi, after)
            self.ioapic.set_level(layout.isa_irq_to_ioapic_pin(gsi), after)
        else:
            self.ioapic.set_level(gsi, after)

    def _note_pending(self) -> None:
        """The 8259's INT output rose: wake the CPUs it reaches."""
        self._woken.update(apic.index for apic in self.lapics if apic.accepts_pic_interrupts())

    def attach(self, pio: Bus, mmio: Bus, current_cpu: Callable[[], int] | None = None) -> None:
        """Register the controllers' ports and MMIO windows on the machine's buses."""
        pio.register(pic.MASTER_PORT, 2, _Guarded(self, self.pic.master), "8259 master")
        pio.register(pic.SLAVE_PORT, 2, _Guarded(self, self.pic.slave), "8259 slave")
        pio.register(pic.ELCR_PORT, 2, _Guarded(self, self.pic.elcr), "8259 ELCR")
        pio.register(pit.PORT, 4, _Guarded(self, self.pit, self.pit.next_deadline), "8254 PIT")
        pio.register(pit.PORT_B, 1, _Guarded(self, self.pit.speaker, self.pit.next_deadline), "port 0x61")
        mmio.register(layout.IOAPIC_BASE, ioapic.WINDOW_SIZE, _Guarded(self, self.ioapic), "I/O APIC")
        if current_cpu is not None:
            mmio.register(layout.LAPIC_BASE, lapic.WINDOW_SIZE, LapicWindow(self, current_cpu), "local APIC")

    # -- the local APIC page -----------------------------------------------------

    def lapic_read(self, cpu: int, offset: int, size: int) -> int:
        """A read of the 4 KiB local APIC page by vCPU `cpu`."""
        with self._critical:
            apic = self.lapics[cpu]
            deadline = apic.next_deadline()
            value = apic.read(offset, size)
            if apic.next_deadline() != deadline:
                self._deadline_dirty = True
            return value

    def lapic_write(self, cpu: int, offset: int, size: int, value: int) -> None:
        """A write to the local APIC page by vCPU `cpu`."""
        with self._critical:
            apic = self.lapics[cpu]
            deadline = apic.next_deadline()
            apic.write(offset, size, value)
            # An ICR write can reset another CPU's timer (INIT): that path marks
            # the deadline dirty itself, so only this APIC's timer is compared here.
            if apic.next_deadline() != deadline:
                self._deadline_dirty = True

    # -- what a vCPU asks ----------------------------------------------------------

    def has_interrupt(self, cpu: int) -> bool:
        """An external interrupt is ready for `cpu` (does not consume it). Ask only when
        the guest can take one (RFLAGS.IF=1, no STI/MOV SS shadow)."""
        with self._critical:
            self._poll_timers()
            apic = self.lapics[cpu]
            if apic.accepts_pic_interrupts() and self.pic.has_interrupt():
                return True
            return apic.highest_deliverable() is not None

    def acknowledge(self, cpu: int) -> int | None:
        """The INTA cycle: the vector to deliver, now in service (local APIC ISR or 8259
        ISR), or None if nothing is pending any more. An 8259 vector may be its
        spurious IRQ7/15, which the guest expects to handle."""
        with self._critical:
            self._poll_timers()
            apic = self.lapics[cpu]
            # The 8259 first, as KVM does: ExtINT is not subject to the APIC's priorities.
            if apic.accepts_pic_interrupts() and self.pic.has_interrupt():
                return self.pic.acknowledge()
            return apic.acknowledge()

    def in_service(self, cpu: int) -> bool:
        """`cpu` has an interrupt in service (its handler has not sent the EOI): at its local
        APIC, or at the 8259 when the 8259 reaches it."""
        with self._critical:
            apic = self.lapics[cpu]
            if apic.isr:
                return True
            return apic.accepts_pic_interrupts() and bool(self.pic.master.isr | self.pic.slave.isr)

    def acknowledge_if_idle(self, cpu: int) -> int | None:
        """`acknowledge`, only if `cpu` has no NMI waiting and no interrupt in service (one
        decision under the lock): for a vCPU that hands the vector on and delivers it a few
        instructions later, when an NMI must come first and an EOI must not end it early."""
        with self._critical:
            if self.lapics[cpu].nmi_pending or self.in_service(cpu):
                return None
            return self.acknowledge(cpu)

    def has_nmi(self, cpu: int) -> bool:
        """An NMI (an NMI IPI, or LINT1) waits for `cpu`; NMIs ignore RFLAGS.IF."""
        with self._critical:
            return self.lapics[cpu].nmi_pending

    def take_nmi(self, cpu: int) -> bool:
        with self._critical:
            return self.lapics[cpu].take_nmi()


    # -- timers ------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """When the next timer interrupt is due (it may be past: then it is due now), or None."""
        with self._critical:
            if self._deadline_dirty:
                self._recompute_deadline()
            return self._deadline

    def update(self, now: int | None = None) -> None:
        """Fire the timers due at `now` (default: the clock); missed periods coalesce.
        `has_interrupt` and `acknowledge` do this themselves."""
        with self._critical:
            self._fire_timers(self.clock() if now is None else now)

    def _poll_timers(self) -> None:
        if self._deadline_dirty:
            self._recompute_deadline()
        if self._deadline is not None:
            now = self.clock()
            if now >= self._deadline:
                self._fire_timers(now)

    def _fire_timers(self, now: int) -> None:
        self.pit.update(now)
        for apic in self.lapics:
            apic.update(now)
        self._recompute_deadline()

    def _recompute_deadline(self) -> None:
        deadlines = [apic.next_deadline() for apic in self.lapics]
        deadlines.append(self.pit.next_deadline())
        pending = [d for d in deadlines if d is not None]
        deadline = min(pending) if pending else None
        if deadline != self._deadline:
            self.deadline_changes += 1
        self._deadline = deadline
        self._deadline_dirty = False
