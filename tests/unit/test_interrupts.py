"""The interrupt router: PC wiring, what a vCPU asks, timers, callbacks and threads."""

from __future__ import annotations

import threading

import pytest

from devices import i8042
from devices import lapic as L
from devices.interrupts import InterruptRouter
from devices.ioapic import ENTRY_LEVEL, ENTRY_REMOTE_IRR
from vmm import layout
from vmm.bus import Bus

PIC_VECTOR_BASE = 0x30


class FakeClock:
    def __init__(self) -> None:
        self.now = 7_000_000

    def __call__(self) -> int:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.wakes = 0
        self.woken: list[int] = []
        self.inits: list[int] = []
        self.sipis: list[tuple[int, int]] = []

    def wake(self) -> None:
        self.wakes += 1

    def wake_cpu(self, cpu: int) -> None:
        self.woken.append(cpu)

    def on_init(self, cpu: int) -> None:
        self.inits.append(cpu)

    def on_sipi(self, cpu: int, vector: int) -> None:
        self.sipis.append((cpu, vector))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def make(cpus: int, clock, rec) -> tuple[InterruptRouter, Bus, Bus, list[int]]:
    router = InterruptRouter(
        cpus, clock=clock, wake=rec.wake, wake_cpu=rec.wake_cpu, on_init=rec.on_init, on_sipi=rec.on_sipi
    )
    pio, mmio = Bus("pio"), Bus("mmio")
    current = [0]
    router.attach(pio, mmio, current_cpu=lambda: current[0])
    return router, pio, mmio, current


def init_pic(pio: Bus, imr_master: int = 0xFF, imr_slave: int = 0xFF) -> None:
    for base, vectors, icw3, imr in ((0x20, 0x30, 4, imr_master), (0xA0, 0x38, 2, imr_slave)):
        for port, value in ((0, 0x11), (1, vectors), (1, icw3), (1, 0x01), (1, imr)):
            pio.write(base + port, 1, value)


def enable_apic(router: InterruptRouter, cpu: int) -> None:
    router.lapic_write(cpu, L.REG_SVR, 4, 0x1FF)


def ioapic_route(mmio: Bus, pin: int, low: int, dest: int = 0) -> None:
    base = layout.IOAPIC_BASE
    mmio.write(base, 4, 0x11 + 2 * pin)
    mmio.write(base + 0x10, 4, dest << 24)
    mmio.write(base, 4, 0x10 + 2 * pin)
    mmio.write(base + 0x10, 4, low)


def ioapic_entry(mmio: Bus, pin: int) -> int:
    mmio.write(layout.IOAPIC_BASE, 4, 0x10 + 2 * pin)
    return mmio.read(layout.IOAPIC_BASE + 0x10, 4)


# -- construction and wiring --------------------------------------------------------


@pytest.mark.parametrize("cpus", [0, 255, -1])
def test_cpu_count_is_checked(cpus):
    with pytest.raises(ValueError):
        InterruptRouter(cpus)


@pytest.mark.parametrize("gsi", [2, -1, 24])
def test_irq_lines_that_do_not_exist(gsi):
    with pytest.raises(ValueError):
        InterruptRouter(1).irq_line(gsi)


def test_ports_are_registered(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0xA5)
    assert pio.read(0x21, 1) == 0xA5
    pio.write(0x4D0, 1, 0x20)
    assert router.pic.master.elcr == 0x20
    assert mmio.read(layout.IOAPIC_BASE, 4) == 0  # IOREGSEL
    assert pio.find(0x43) is not None and pio.find(0x61) is not None


def test_attach_coexists_with_the_pc_port_set():
    """The machine builder registers the legacy ports and the i8042 beside the platform."""
    from devices.legacy import register_legacy_ports

    pio, mmio = Bus("pio"), Bus("mmio")
    InterruptRouter(1).attach(pio, mmio)
    register_legacy_ports(pio, reset=lambda: None)
    pio.register(i8042.DATA_PORT, 1, object(), "i8042-data")
    pio.register(i8042.COMMAND_PORT, 1, object(), "i8042-cmd")
    assert pio.find(0x61).name == "port 0x61"


def test_isa_irq_reaches_the_bsp_through_the_pic(clock, rec):
    router, pio, _, _ = make(2, clock, rec)
    init_pic(pio, imr_master=0xFF & ~(1 << 4))
    line = router.irq_line(4)
    assert not router.has_interrupt(0)
    line.pulse()
    assert router.has_interrupt(0)
    assert not router.has_interrupt(1)  # APs' LINT0 is masked
    assert rec.wakes >= 1
    assert router.acknowledge(0) == PIC_VECTOR_BASE + 4
    assert not router.has_interrupt(0)
    pio.write(0x20, 1, 0x20)  # EOI


def test_in_service_lasts_from_acknowledge_to_eoi(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0xFF & ~(1 << 4))
    line = router.irq_line(4)
    line.pulse()
    assert not router.in_service(0)
    router.acknowledge(0)  # through the 8259 (the local APIC passes ExtINT on)
    assert router.in_service(0)
    pio.write(0x20, 1, 0x20)  # the 8259's EOI
    assert not router.in_service(0)
    init_pic(pio)
    enable_apic(router, 0)
    ioapic_route(mmio, 4, 0x24)
    line.pulse()
    assert router.acknowledge(0) == 0x24
    assert router.in_service(0)
    router.lapic_write(0, L.REG_EOI, 4, 0)
    assert not router.in_service(0)


def test_acknowledge_if_idle_waits_for_the_handler_in_service_and_for_a_waiting_nmi(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    init_pic(pio)
    enable_apic(router, 0)
    ioapic_route(mmio, 4, 0x24)
    ioapic_route(mmio, 5, 0x35)
    router.irq_line(4).pulse()
    assert router.acknowledge_if_idle(0) == 0x24
    router.irq_line(5).pulse()  # deliverable above 0x24, but 0x24's handler has not sent its EOI
    assert router.has_interrupt(0) and router.acknowledge_if_idle(0) is None
    router.lapic_write(0, L.REG_EOI, 4, 0)
    router.lapics[0].nmi_pending = True
    assert router.acknowledge_if_idle(0) is None
    assert router.take_nmi(0)
    assert router.acknowledge_if_idle(0) == 0x35
    assert router.in_service(0)


def test_pic_is_cut_off_when_lint0_is_masked(clock, rec):
    router, pio, _, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0xFF & ~(1 << 4))
    enable_apic(router, 0)
    router.lapic_write(0, L.REG_LVT_LINT0, 4, L.LVT_MASKED | (L.EXTINT << 8))
    router.irq_line(4).pulse()
    assert not router.has_interrupt(0)
    assert router.acknowledge(0) is None


def test_isa_irq_reaches_the_ioapic_too(clock, rec):
    router, pio, mmio, _ = make(2, clock, rec)
    init_pic(pio)  # all masked at the PIC, as Linux leaves it with the I/O APIC in use
    enable_apic(router, 1)
    ioapic_route(mmio, 4, 0x24, dest=1)
    router.irq_line(4).pulse()
    assert not router.has_interrupt(0)
    assert router.has_interrupt(1)
    assert router.acknowledge(1) == 0x24


def test_irq0_is_ioapic_pin_2(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    init_pic(pio)
    enable_apic(router, 0)
    ioapic_route(mmio, 0, 0x20)
    ioapic_route(mmio, 2, 0x22)
    router.irq_line(0).pulse()
    assert router.acknowledge(0) == 0x22


def test_gsi_above_15_is_ioapic_only(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0, imr_slave=0)
    enable_apic(router, 0)
    ioapic_route(mmio, 20, ENTRY_LEVEL | 0x54)
    router.irq_line(20).set_level(True)
    assert router.acknowledge(0) == 0x54  # not an 8259 vector


def test_shared_level_lines_are_wire_ored(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    enable_apic(router, 0)
    ioapic_route(mmio, 21, ENTRY_LEVEL | 0x55)
    first, second = router.irq_line(21), router.irq_line(21)
    first.set_level(True)
    second.set_level(True)
    assert router.acknowledge(0) == 0x55
    first.set_level(False)
    router.lapic_write(0, L.REG_EOI, 4, 0)
    assert router.acknowledge(0) == 0x55  # second still holds the line
    second.set_level(False)
    router.lapic_write(0, L.REG_EOI, 4, 0)
    assert not router.has_interrupt(0)
    assert not ioapic_entry(mmio, 21) & ENTRY_REMOTE_IRR


def test_level_triggered_eoi_goes_back_to_the_ioapic(clock, rec):
    router, _, mmio, _ = make(1, clock, rec)
    enable_apic(router, 0)
    ioapic_route(mmio, 10, ENTRY_LEVEL | 0x5A)
    line = router.irq_line(10)
    line.set_level(True)
    assert router.acknowledge(0) == 0x5A
    assert ioapic_entry(mmio, 10) & ENTRY_REMOTE_IRR
    router.lapic_write(0, L.REG_EOI, 4, 0)
    # The device still asserts the line: the EOI makes the I/O APIC send again.
    assert router.acknowledge(0) == 0x5A
    line.set_level(False)
    router.lapic_write(0, L.REG_EOI, 4, 0)
    assert not ioapic_entry(mmio, 10) & ENTRY_REMOTE_IRR
    assert not router.has_interrupt(0)


# -- the LAPIC page ------------------------------------------------------------------


def test_lapic_page_answers_for_the_current_cpu(clock, rec):
    router, _, mmio, current = make(3, clock, rec)
    current[0] = 2
    assert mmio.read(layout.LAPIC_BASE + L.REG_ID, 4) == 2 << 24
    current[0] = 0
    assert mmio.read(layout.LAPIC_BASE + L.REG_ID, 4) == 0
    assert router.lapic_read(1, L.REG_ID, 4) == 1 << 24


def test_msr_and_task_priority(clock, rec):
    router, _, _, _ = make(2, clock, rec)
    assert router.lapics[0].apic_base_msr() & L.APIC_BASE_BSP
    assert not router.lapics[1].apic_base_msr() & L.APIC_BASE_BSP
    enable_apic(router, 0)
    router.lapics[0].accept(L.FIXED, 0x45, False)
    router.lapic_write(0, L.REG_TPR, 4, 0x50)  # as the guest writes it, through the APIC page
    assert router.lapic_read(0, L.REG_TPR, 4) == 0x50
    assert not router.has_interrupt(0)  # TPR class 5 masks vector 0x45
    router.lapic_write(0, L.REG_TPR, 4, 0x30)
    assert router.lapic_read(0, L.REG_TPR, 4) >> 4 == 3
    assert router.acknowledge(0) == 0x45


# -- IPIs and start-up -----------------------------------------------------------------


def test_fixed_ipi_wakes_the_target(clock, rec):
    router, _, _, _ = make(2, clock, rec)
    enable_apic(router, 1)
    wakes = rec.wakes
    router.lapic_write(0, L.REG_ICR_HIGH, 4, 1 << 24)
    router.lapic_write(0, L.REG_ICR_LOW, 4, 0x4000 | 0xFB)
    assert rec.wakes == wakes + 1
    assert rec.woken == [1]
    assert router.has_interrupt(1) and not router.has_interrupt(0)
    assert router.acknowledge(1) == 0xFB


def test_wake_cpu_names_every_target_once_per_burst(clock, rec):
    router, _, _, _ = make(4, clock, rec)
    for cpu in range(4):
        enable_apic(router, cpu)
    rec.woken.clear()
    router.lapic_write(2, L.REG_ICR_LOW, 4, (L.ALL_EXCLUDING_SELF << 18) | 0xF7)
    assert rec.woken == [0, 1, 3]


def test_pic_interrupt_wakes_the_cpus_it_reaches(clock, rec):
    router, pio, _, _ = make(2, clock, rec)
    init_pic(pio, imr_master=0xEF)
    rec.woken.clear()
    router.irq_line(4).pulse()
    assert rec.woken == [0]  # only the BSP has LINT0 in ExtINT mode


def test_init_and_sipi_reach_the_scheduler(clock, rec):
    router, _, _, _ = make(3, clock, rec)
    for ap in (1, 2):
        router.lapic_write(0, L.REG_ICR_HIGH, 4, ap << 24)
        router.lapic_write(0, L.REG_ICR_LOW, 4, 0xC500)  # INIT, level, assert
        router.lapic_write(0, L.REG_ICR_LOW, 4, 0x8500)  # INIT de-assert
        router.lapic_write(0, L.REG_ICR_LOW, 4, 0x4600 | 0x9A)  # SIPI
        router.lapic_write(0, L.REG_ICR_LOW, 4, 0x4600 | 0x9A)  # second SIPI
    assert rec.inits == [1, 2]
    assert rec.sipis == [(1, 0x9A), (2, 0x9A)]
    assert set(rec.woken) == {1, 2}


def test_nmi_ipi_and_injected_nmi(clock, rec):
    router, _, _, _ = make(2, clock, rec)
    router.lapic_write(0, L.REG_ICR_HIGH, 4, 1 << 24)
    router.lapic_write(0, L.REG_ICR_LOW, 4, (L.NMI << 8) | 0x4000)
    assert router.has_nmi(1) and not router.has_nmi(0)
    assert router.take_nmi(1)
    assert not router.has_nmi(1)
    for apic in router.lapics:  # LINT1 is NMI on the BSP only (firmware defaults)
        apic.lint1()
    assert router.take_nmi(0)
    assert not router.take_nmi(1)


def test_thirty_two_cpus_broadcast_ipi(clock, rec):
    router, _, _, _ = make(32, clock, rec)
    for cpu in range(32):
        enable_apic(router, cpu)
    router.lapic_write(5, L.REG_ICR_LOW, 4, (L.ALL_EXCLUDING_SELF << 18) | 0xF7)
    assert [router.has_interrupt(cpu) for cpu in range(32)] == [cpu != 5 for cpu in range(32)]


# -- timers --------------------------------------------------------------------------


def test_pit_tick_through_the_pic_without_explicit_update(clock, rec):
    router, pio, _, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0xFE)
    pio.write(0x43, 1, 0x34)  # channel 0, word, mode 2
    pio.write(0x40, 1, 11932 & 0xFF)
    pio.write(0x40, 1, 11932 >> 8)
    deadline = router.next_deadline()
    assert deadline is not None and deadline > clock.now
    assert not router.has_interrupt(0)
    clock.now = deadline
    assert router.has_interrupt(0)  # timers are evaluated lazily when asked
    assert router.acknowledge(0) == PIC_VECTOR_BASE
    pio.write(0x20, 1, 0x20)
    assert router.next_deadline() > deadline


def test_next_deadline_is_the_earliest_timer(clock, rec):
    router, pio, _, _ = make(2, clock, rec)
    assert router.next_deadline() is None
    pio.write(0x43, 1, 0x34)
    pio.write(0x40, 1, 0x00)
    pio.write(0x40, 1, 0x00)  # 65536 ticks: ~55 ms
    pit_deadline = router.next_deadline()
    enable_apic(router, 1)
    router.lapic_write(1, L.REG_TIMER_DIVIDE, 4, 0xB)
    router.lapic_write(1, L.REG_LVT_TIMER, 4, 0xEF)
    router.lapic_write(1, L.REG_TIMER_INITIAL, 4, 1_000_000)  # 1 ms
    assert router.next_deadline() == clock.now + 1_000_000 < pit_deadline
    router.update(clock.now + 1_000_000)
    assert router.acknowledge(1) == 0xEF
    assert router.next_deadline() == pit_deadline


def test_lapic_timer_wakes_only_when_due(clock, rec):
    router, _, _, _ = make(1, clock, rec)
    enable_apic(router, 0)
    router.lapic_write(0, L.REG_TIMER_DIVIDE, 4, 0xB)
    router.lapic_write(0, L.REG_LVT_TIMER, 4, L.LVT_PERIODIC | 0xEF)
    router.lapic_write(0, L.REG_TIMER_INITIAL, 4, 4_000_000)
    wakes = rec.wakes
    router.update(clock.now + 3_999_999)
    assert rec.wakes == wakes and not router.has_interrupt(0)
    router.update(clock.now + 4_000_000)
    assert rec.wakes == wakes + 1
    clock.now += 4_000_000
    assert router.acknowledge(0) == 0xEF


# -- threads and callbacks ---------------------------------------------------------------


def test_wake_is_called_without_the_lock_held(clock):
    router = InterruptRouter(1, clock=clock)
    pio, mmio = Bus("pio"), Bus("mmio")
    router.attach(pio, mmio)
    init_pic(pio, imr_master=0xEF)
    answers = []

    def wake() -> None:
        # Another thread must be able to use the router while wake() runs.
        other = threading.Thread(target=lambda: answers.append(router.has_interrupt(0)))
        other.start()
        other.join(timeout=10)
        answers.append(other.is_alive())

    router.wake = wake
    router.irq_line(4).pulse()
    assert answers == [True, False]


def test_callbacks_may_reenter_the_router(clock):
    router = InterruptRouter(2, clock=clock)
    seen = []
    router.on_init = lambda cpu: seen.append(router.lapic_read(cpu, L.REG_TPR, 4))
    router.lapic_write(0, L.REG_ICR_HIGH, 4, 1 << 24)
    router.lapic_write(0, L.REG_ICR_LOW, 4, 0x4500)
    assert seen == [0]


def test_device_thread_raising_lines_while_vcpu_acknowledges(clock, rec):
    router, pio, mmio, _ = make(1, clock, rec)
    enable_apic(router, 0)
    init_pic(pio)
    ioapic_route(mmio, 5, 0x25)
    line = router.irq_line(5)
    pulses = 2000
    done = threading.Event()
    errors: list[BaseException] = []

    def device() -> None:
        try:
            for _ in range(pulses):
                line.pulse()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=device)
    thread.start()
    taken = 0
    while not done.is_set() or router.has_interrupt(0):
        vector = router.acknowledge(0)
        if vector is not None:
            assert vector == 0x25
            taken += 1
            router.lapic_write(0, L.REG_EOI, 4, 0)
    thread.join(timeout=30)
    assert not errors
    assert 1 <= taken <= pulses  # edges coalesce in IRR, none is invented
    assert router.lapics[0].isr == 0


def test_deadline_changes_counts_accesses_that_move_a_timer(clock, rec):
    router, pio, _, _ = make(1, clock, rec)
    init_pic(pio, imr_master=0xFE)
    before = router.deadline_changes
    pio.write(0x21, 1, 0xFC)  # the PIC's mask: no timer moves
    assert router.deadline_changes == before
    pio.write(0x43, 1, 0x34)
    pio.write(0x40, 1, 11932 & 0xFF)
    pio.write(0x40, 1, 11932 >> 8)  # the PIT starts counting: now there is a deadline
    assert router.deadline_changes > before
    armed = router.deadline_changes
    enable_apic(router, 0)
    router.lapic_write(0, L.REG_TIMER_DIVIDE, 4, 0xB)
    router.lapic_write(0, L.REG_LVT_TIMER, 4, 0xEF)
    assert router.deadline_changes == armed
    router.lapic_write(0, L.REG_TIMER_INITIAL, 4, 1_000)  # earlier than the PIT's
    assert router.deadline_changes > armed
