"""The xAPIC local APIC and the APIC bus between them, with a fake clock."""

from __future__ import annotations

import random

import pytest

from devices import lapic as L
from devices.lapic import ApicBus, ApicMessage, LocalApic, NullLapicHost


class FakeClock:
    def __init__(self) -> None:
        self.now = 5_000_000

    def __call__(self) -> int:
        return self.now


class BusHost(NullLapicHost):
    """A host whose IPIs really travel over an ApicBus (and are recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.bus: ApicBus | None = None

    def send(self, message: ApicMessage) -> None:
        super().send(message)
        assert self.bus is not None
        self.bus.deliver(message)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def host() -> NullLapicHost:
    return NullLapicHost()


@pytest.fixture
def apic(host, clock) -> LocalApic:
    a = LocalApic(0, host, clock)
    a.write(L.REG_SVR, 4, 0x1FF)  # software-enable, spurious vector 0xFF
    return a


def make_cpus(n: int, clock) -> tuple[list[LocalApic], BusHost]:
    host = BusHost()
    apics = [LocalApic(i, host, clock) for i in range(n)]
    host.bus = ApicBus(apics)
    for a in apics:
        a.write(L.REG_SVR, 4, 0x1FF)
    return apics, host


def send_ipi(apic: LocalApic, low: int, dest: int = 0) -> None:
    apic.write(L.REG_ICR_HIGH, 4, dest << 24)
    apic.write(L.REG_ICR_LOW, 4, low)


# -- identification ------------------------------------------------------------


def test_id_and_version(host, clock):
    a = LocalApic(5, host, clock)
    assert a.read(L.REG_ID, 4) == 5 << 24
    assert a.read(L.REG_ID + 3, 1) == 5
    version = a.read(L.REG_VERSION, 4)
    assert version & 0xFF == 0x14
    assert (version >> 16) & 0xFF == 5  # six LVT entries
    assert not version & (1 << 24)  # no EOI-broadcast suppression


def test_reset_state(host, clock):
    a = LocalApic(1, host, clock)
    assert a.read(L.REG_SVR, 4) == 0xFF
    assert a.read(L.REG_DFR, 4) == 0xFFFFFFFF
    for reg in L.LVT_REGISTERS:
        assert a.read(reg, 4) == L.LVT_MASKED
    assert a.waiting_for_sipi  # an AP waits for INIT/SIPI
    assert not LocalApic(0, host, clock).waiting_for_sipi


# -- acceptance, priority, EOI ---------------------------------------------------


def test_fixed_interrupt_through_irr_isr_eoi(apic, host):
    apic.accept(L.FIXED, 0x41, False)
    assert host.pending == [0]
    assert apic.read(L.REG_IRR + 0x20, 4) == 1 << 1  # vector 0x41: word 2, bit 1
    assert apic.highest_deliverable() == 0x41
    assert apic.acknowledge() == 0x41
    assert apic.read(L.REG_IRR + 0x20, 4) == 0
    assert apic.read(L.REG_ISR + 0x20, 4) == 1 << 1
    assert apic.read(L.REG_PPR, 4) == 0x40
    apic.write(L.REG_EOI, 4, 0)
    assert apic.isr == 0
    assert host.eois == []  # edge-triggered: no broadcast


def test_software_disabled_apic_drops_fixed_interrupts(host, clock):
    a = LocalApic(0, host, clock)
    a.accept(L.FIXED, 0x41, False)
    assert a.irr == 0


def test_highest_vector_first_and_in_service_blocks_same_class(apic):
    apic.accept(L.FIXED, 0x31, False)
    apic.accept(L.FIXED, 0x52, False)
    assert apic.acknowledge() == 0x52
    apic.accept(L.FIXED, 0x55, False)  # same priority class as 0x52 in service
    assert apic.highest_deliverable() is None
    apic.accept(L.FIXED, 0x61, False)  # a higher class nests
    assert apic.acknowledge() == 0x61
    apic.write(L.REG_EOI, 4, 0)  # ends 0x61
    assert apic.highest_deliverable() is None
    apic.write(L.REG_EOI, 4, 0)  # ends 0x52
    assert apic.acknowledge() == 0x55


def test_tpr_masks_lower_priority_classes(apic, host):
    apic.write(L.REG_TPR, 4, 0x50)
    apic.accept(L.FIXED, 0x5F, False)
    assert apic.highest_deliverable() is None
    assert apic.read(L.REG_PPR, 4) == 0x50
    apic.accept(L.FIXED, 0x60, False)
    assert apic.highest_deliverable() == 0x60
    apic.acknowledge()
    apic.write(L.REG_EOI, 4, 0)
    host.pending.clear()
    apic.write(L.REG_TPR, 4, 0x00)  # lowering TPR releases 0x5F and says so
    assert apic.highest_deliverable() == 0x5F
    assert host.pending == [0]


def test_level_triggered_eoi_is_broadcast(apic, host):
    apic.accept(L.FIXED, 0x70, True)
    assert apic.read(L.REG_TMR + 0x30, 4) == 1 << 16
    apic.acknowledge()
    apic.write(L.REG_EOI, 4, 0)
    assert host.eois == [0x70]


def test_illegal_vector_received_sets_esr(apic):
    apic.accept(L.FIXED, 0x05, False)
    assert apic.irr == 0
    apic.write(L.REG_ESR, 4, 0)  # write latches the errors into the readable ESR
    assert apic.read(L.REG_ESR, 4) == L.ESR_RECEIVE_ILLEGAL_VECTOR
    apic.write(L.REG_ESR, 4, 0)
    assert apic.read(L.REG_ESR, 4) == 0


def test_error_lvt_delivers_on_error(apic):
    apic.write(L.REG_LVT_ERROR, 4, 0xFE)
    send_ipi(apic, 0x0003)  # fixed IPI with illegal vector 3
    assert apic.highest_deliverable() == 0xFE
    apic.write(L.REG_ESR, 4, 0)
    assert apic.read(L.REG_ESR, 4) == L.ESR_SEND_ILLEGAL_VECTOR


def test_reserved_register_read_sets_illegal_register_error(apic):
    assert apic.read(0x2F0, 4) == 0  # LVT CMCI is not offered
    apic.write(L.REG_ESR, 4, 0)
    assert apic.read(L.REG_ESR, 4) == L.ESR_ILLEGAL_REGISTER


def test_partial_writes_are_ignored(apic):
    apic.write(L.REG_TPR, 1, 0x50)
    apic.write(L.REG_TPR + 1, 4, 0x50)
    assert apic.read(L.REG_TPR, 4) == 0


# -- LVT rules ---------------------------------------------------------------------


def test_lvt_stays_masked_while_software_disabled(host, clock):
    a = LocalApic(0, host, clock)
    a.write(L.REG_LVT_LINT0, 4, 0x700)
    assert a.read(L.REG_LVT_LINT0, 4) == 0x700 | L.LVT_MASKED
    a.write(L.REG_SVR, 4, 0x1FF)
    a.write(L.REG_LVT_LINT0, 4, 0x700)
    assert a.read(L.REG_LVT_LINT0, 4) == 0x700
    a.write(L.REG_SVR, 4, 0x0FF)  # disabling masks every LVT
    assert a.read(L.REG_LVT_LINT0, 4) & L.LVT_MASKED


def test_tsc_deadline_mode_is_not_writable(apic):
    apic.write(L.REG_LVT_TIMER, 4, (2 << 17) | 0x40)
    assert apic.read(L.REG_LVT_TIMER, 4) == 0x40


def test_firmware_defaults_route_the_pic_through_lint0(host, clock):
    a = LocalApic(0, host, clock)
    assert not a.accepts_pic_interrupts()
    a.set_firmware_defaults()
    assert a.accepts_pic_interrupts()
    assert a.read(L.REG_LVT_LINT1, 4) == L.NMI << 8
    a.lint1()
    assert a.take_nmi()
    assert not a.take_nmi()


def test_hardware_disabled_bsp_takes_pic_directly(host, clock):
    bsp = LocalApic(0, host, clock)
    ap = LocalApic(1, host, clock)
    assert bsp.apic_base_msr() == 0xFEE00000 | L.APIC_BASE_BSP | L.APIC_BASE_ENABLE
    assert ap.apic_base_msr() == 0xFEE00000 | L.APIC_BASE_ENABLE
    bsp.set_apic_base_msr(0xFEE00000)
    ap.set_apic_base_msr(0xFEE00000)
    assert bsp.accepts_pic_interrupts()
    assert not ap.accepts_pic_interrupts()
    assert not bsp.matches(L.BROADCAST, False)


# -- timer -----------------------------------------------------------------------


def test_one_shot_timer(apic, clock, host):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0xB)  # divide by 1: 1 tick per ns at 1 GHz
    apic.write(L.REG_LVT_TIMER, 4, 0xEC)
    start = clock.now
    apic.write(L.REG_TIMER_INITIAL, 4, 1000)
    assert apic.next_deadline() == start + 1000
    clock.now = start + 400
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 600
    assert apic.highest_deliverable() is None
    clock.now = start + 1000
    apic.update(clock.now)
    assert apic.highest_deliverable() == 0xEC
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 0
    assert apic.next_deadline() is None
    apic.acknowledge()
    apic.write(L.REG_EOI, 4, 0)
    clock.now += 10_000
    apic.update(clock.now)
    assert apic.irr == 0  # a one-shot fires once


def test_periodic_timer(apic, clock):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0x3)  # divide by 16
    apic.write(L.REG_LVT_TIMER, 4, L.LVT_PERIODIC | 0xEC)
    start = clock.now
    apic.write(L.REG_TIMER_INITIAL, 4, 62_500)  # 1 ms
    assert apic.next_deadline() == start + 1_000_000
    clock.now = start + 1_000_000 + 16 * 100
    apic.update(clock.now)
    assert apic.acknowledge() == 0xEC
    apic.write(L.REG_EOI, 4, 0)
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 62_400  # reloaded, 100 ticks into the period
    assert apic.next_deadline() == start + 2_000_000
    clock.now = start + 2_000_000
    apic.update(clock.now)
    assert apic.acknowledge() == 0xEC


def test_periodic_timer_missed_periods_coalesce(apic, clock):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0xB)
    apic.write(L.REG_LVT_TIMER, 4, L.LVT_PERIODIC | 0xEC)
    start = clock.now
    apic.write(L.REG_TIMER_INITIAL, 4, 1_000_000)
    clock.now = start + 5_500_000
    apic.update(clock.now)
    assert apic.acknowledge() == 0xEC
    assert apic.next_deadline() == start + 6_000_000


def test_periodic_timer_has_a_minimum_period(apic, clock):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0xB)
    apic.write(L.REG_LVT_TIMER, 4, L.LVT_PERIODIC | 0xEC)
    start = clock.now
    apic.write(L.REG_TIMER_INITIAL, 4, 1)
    assert apic.next_deadline() >= start + L.MIN_PERIODIC_NS


def test_masked_timer_counts_but_does_not_interrupt(apic, clock):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0xB)
    apic.write(L.REG_LVT_TIMER, 4, L.LVT_MASKED | 0xEC)
    apic.write(L.REG_TIMER_INITIAL, 4, 1000)
    assert apic.next_deadline() is None
    clock.now += 300
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 700
    clock.now += 1000
    apic.update(clock.now)
    assert apic.irr == 0


def test_writing_zero_initial_count_stops_the_timer(apic, clock):
    apic.write(L.REG_LVT_TIMER, 4, L.LVT_PERIODIC | 0xEC)
    apic.write(L.REG_TIMER_INITIAL, 4, 100_000)
    apic.write(L.REG_TIMER_INITIAL, 4, 0)
    assert apic.next_deadline() is None
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 0


def test_divide_configuration_values(apic):
    expected = {0x0: 2, 0x1: 4, 0x2: 8, 0x3: 16, 0x8: 32, 0x9: 64, 0xA: 128, 0xB: 1}
    for config, divisor in expected.items():
        apic.write(L.REG_TIMER_DIVIDE, 4, config)
        assert apic.timer_divisor == divisor
        assert apic.read(L.REG_TIMER_DIVIDE, 4) == config


def test_divide_change_keeps_count_continuous(apic, clock):
    apic.write(L.REG_TIMER_DIVIDE, 4, 0xB)
    apic.write(L.REG_LVT_TIMER, 4, 0xEC)
    apic.write(L.REG_TIMER_INITIAL, 4, 1000)
    clock.now += 400
    apic.write(L.REG_TIMER_DIVIDE, 4, 0x0)  # divide by 2 from now on
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 600
    clock.now += 200
    assert apic.read(L.REG_TIMER_CURRENT, 4) == 500


# -- IPIs over the bus ---------------------------------------------------------------


def test_fixed_ipi_physical_destination(clock):
    apics, host = make_cpus(4, clock)
    send_ipi(apics[0], 0x4000 | 0xFB, dest=2)  # fixed, assert, vector 0xFB
    assert [a.highest_deliverable() for a in apics] == [None, None, 0xFB, None]
    message = host.sent[0]
    assert message.source == 0 and message.destination == 2 and not message.logical
    assert apics[0].read(L.REG_ICR_LOW, 4) & (1 << 12) == 0  # delivery status idle


def test_broadcast_and_shorthands(clock):
    apics, _ = make_cpus(3, clock)
    send_ipi(apics[1], 0xF0, dest=0xFF)
    assert all(a.highest_deliverable() == 0xF0 for a in apics)
    for a in apics:
        a.irr = 0
    send_ipi(apics[1], (L.SELF << 18) | 0xF1)
    assert [a.highest_deliverable() for a in apics] == [None, 0xF1, None]
    apics[1].irr = 0
    send_ipi(apics[1], (L.ALL_EXCLUDING_SELF << 18) | 0xF2)
    assert [a.highest_deliverable() for a in apics] == [0xF2, None, 0xF2]
    for a in apics:
        a.irr = 0
    send_ipi(apics[1], (L.ALL_INCLUDING_SELF << 18) | 0xF3)
    assert all(a.highest_deliverable() == 0xF3 for a in apics)


def test_logical_flat_destination(clock):
    apics, _ = make_cpus(4, clock)
    for i, a in enumerate(apics):
        a.write(L.REG_LDR, 4, (1 << i) << 24)
    send_ipi(apics[0], (1 << 11) | 0xE0, dest=0b1010)
    assert [a.highest_deliverable() for a in apics] == [None, 0xE0, None, 0xE0]


def test_logical_cluster_destination(clock):
    apics, _ = make_cpus(4, clock)
    for i, a in enumerate(apics):
        a.write(L.REG_DFR, 4, 0x0FFFFFFF)  # cluster model
        cluster, member = divmod(i, 2)
        a.write(L.REG_LDR, 4, (cluster << 4 | 1 << member) << 24)
    assert apics[0].read(L.REG_DFR, 4) == 0x0FFFFFFF
    send_ipi(apics[0], (1 << 11) | 0xE0, dest=0x13)  # cluster 1, members 0 and 1
    assert [a.highest_deliverable() for a in apics] == [None, None, 0xE0, 0xE0]


def test_lowest_priority_picks_the_lowest_tpr(clock):
    apics, _ = make_cpus(3, clock)
    apics[0].write(L.REG_TPR, 4, 0x40)
    apics[1].write(L.REG_TPR, 4, 0x20)
    apics[2].write(L.REG_TPR, 4, 0x30)
    send_ipi(apics[0], (L.LOWEST_PRIORITY << 8) | 0xD0, dest=0xFF)
    assert [a.highest_deliverable() for a in apics] == [None, 0xD0, None]


def test_nmi_ipi(clock):
    apics, host = make_cpus(2, clock)
    send_ipi(apics[0], (L.NMI << 8) | 0x4000, dest=1)
    assert apics[1].nmi_pending and not apics[0].nmi_pending
    assert host.pending == [1]


def test_init_sipi_sequence(clock):
    apics, host = make_cpus(2, clock)
    ap = apics[1]
    ap.write(L.REG_TPR, 4, 0x20)
    # Linux's wakeup_secondary_cpu_via_init: INIT assert, INIT de-assert, then SIPI twice.
    send_ipi(apics[0], 0xC500, dest=1)
    assert host.inits == [1]
    assert ap.read(L.REG_TPR, 4) == 0  # INIT reset the APIC
    assert ap.read(L.REG_ID, 4) == 1 << 24  # but not its ID
    send_ipi(apics[0], 0x8500, dest=1)  # level de-assert: no effect
    assert host.inits == [1]
    send_ipi(apics[0], 0x4600 | 0x9A, dest=1)
    send_ipi(apics[0], 0x4600 | 0x9A, dest=1)
    assert host.sipis == [(1, 0x9A)]  # the second SIPI finds the AP running


def test_sipi_without_init_is_delivered_once_to_a_fresh_ap(clock):
    apics, host = make_cpus(2, clock)
    send_ipi(apics[0], 0x4600 | 0x10, dest=1)
    send_ipi(apics[1], 0x4600 | 0x10, dest=0)  # the BSP is running: ignored
    assert host.sipis == [(1, 0x10)]


def test_unsupported_ipi_modes_are_dropped(clock):
    apics, host = make_cpus(2, clock)
    for mode in (L.SMI, 3, L.EXTINT):
        send_ipi(apics[0], (mode << 8) | 0x40, dest=1)
    assert host.sent == []
    assert apics[1].irr == 0


def test_thirty_two_cpus_physical_delivery(clock):
    apics, _ = make_cpus(32, clock)
    send_ipi(apics[0], 0x4000 | 0xFD, dest=31)
    assert apics[31].highest_deliverable() == 0xFD
    assert all(a.irr == 0 for a in apics[:31])


def test_random_register_writes_do_not_crash(clock):
    apics, _ = make_cpus(2, clock)
    rng = random.Random(4)
    for _ in range(3000):
        offset = rng.randrange(0, 0x1000) & ~3
        size = rng.choice((1, 2, 4, 4, 4))
        apics[0].write(offset, size, rng.getrandbits(32))
        value = apics[0].read(offset, size)
        assert 0 <= value < 1 << (8 * size)
        clock.now += rng.randrange(0, 100_000)
        apics[0].update(clock.now)
        apics[0].acknowledge()
        deadline = apics[0].next_deadline()
        assert deadline is None or deadline > clock.now
