"""The 8254 PIT and port 0x61, driven by a fake clock."""

from __future__ import annotations

import pytest

from devices.pit import PIT_HZ, Pit
from vmm.bus import NullIrqLine

NS = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000  # not zero, so "time 0" bugs show

    def __call__(self) -> int:
        return self.now

    def advance_ticks(self, ticks: int) -> None:
        """Move to the exact instant `ticks` PIT ticks later (rounded up to the ns)."""
        self.now += -(-ticks * NS // PIT_HZ)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def irq() -> NullIrqLine:
    return NullIrqLine()


@pytest.fixture
def pit(clock, irq) -> Pit:
    return Pit(irq, clock)


def program(pit: Pit, channel: int, mode: int, count: int, access: int = 3) -> None:
    pit.write(3, 1, channel << 6 | access << 4 | mode << 1)
    if access in (1, 3):
        pit.write(channel, 1, count & 0xFF)
    if access in (2, 3):
        pit.write(channel, 1, (count >> 8) & 0xFF)


def latched_count(pit: Pit, channel: int) -> int:
    pit.write(3, 1, channel << 6)  # counter latch command
    low = pit.read(channel, 1)
    return low | pit.read(channel, 1) << 8


def status(pit: Pit, channel: int) -> int:
    pit.write(3, 1, 0xC0 | 0x20 | (2 << channel))  # read-back: status only
    return pit.read(channel, 1)


def test_mode2_counts_down_and_reloads(pit, clock):
    program(pit, 0, 2, 1000)
    assert latched_count(pit, 0) == 1000
    clock.advance_ticks(250)
    assert latched_count(pit, 0) == 750
    clock.advance_ticks(749)
    assert latched_count(pit, 0) == 1
    clock.advance_ticks(1)
    assert latched_count(pit, 0) == 1000  # reloaded
    clock.advance_ticks(10)
    assert latched_count(pit, 0) == 990


def test_mode2_out_goes_low_for_one_tick_at_count_one(pit, clock):
    program(pit, 0, 2, 100)
    assert pit.out(0)
    clock.advance_ticks(98)
    assert pit.out(0)
    clock.advance_ticks(1)  # count is 1
    assert not pit.out(0)
    clock.advance_ticks(1)  # reloaded, OUT high again: the rising edge is the IRQ
    assert pit.out(0)


def test_mode2_raises_irq0_once_per_period(pit, clock, irq):
    program(pit, 0, 2, 11932)  # ~100 Hz, as a HZ=100 kernel programs it
    deadline = pit.next_deadline()
    assert deadline is not None and deadline > clock.now
    clock.now = deadline - 1
    pit.update(clock.now)
    assert irq.edges == 0
    clock.now = deadline
    pit.update(clock.now)
    assert irq.edges == 1
    second = pit.next_deadline()
    assert second - deadline == pytest.approx(11932 * NS / PIT_HZ, abs=2)
    clock.now = second
    pit.update(clock.now)
    assert irq.edges == 2


def test_missed_periods_coalesce_into_one_edge(pit, clock, irq):
    program(pit, 0, 2, 1193)  # 1 ms
    clock.now += 10 * 1_000_000 + 100_000  # 10.1 ms without anyone looking
    pit.update(clock.now)
    assert irq.edges == 1
    assert pit.next_deadline() > clock.now  # the next edge is in the future, not a backlog


def test_mode0_fires_once_at_terminal_count(pit, clock, irq):
    program(pit, 0, 0, 500)
    assert not pit.out(0)  # OUT low while counting in mode 0
    clock.advance_ticks(499)
    pit.update()
    assert irq.edges == 0 and not pit.out(0)
    clock.advance_ticks(1)
    pit.update()
    assert irq.edges == 1 and pit.out(0)
    assert pit.next_deadline() is None
    clock.advance_ticks(100000)
    pit.update()
    assert irq.edges == 1
    assert pit.out(0)  # stays high until reprogrammed


def test_mode0_counter_wraps_after_terminal_count(pit, clock):
    program(pit, 0, 0, 10)
    clock.advance_ticks(12)
    assert latched_count(pit, 0) == 0xFFFE


def test_mode3_square_wave(pit, clock, irq):
    program(pit, 0, 3, 100)
    assert pit.out(0)
    clock.advance_ticks(49)
    assert pit.out(0)
    clock.advance_ticks(1)
    assert not pit.out(0)  # second half of the period
    clock.advance_ticks(50)
    pit.update()
    assert pit.out(0) and irq.edges == 1


def test_mode3_counter_decrements_by_two(pit, clock):
    program(pit, 0, 3, 100)
    clock.advance_ticks(10)
    assert latched_count(pit, 0) == 80


def test_count_zero_means_65536(pit, clock):
    program(pit, 0, 2, 0)
    clock.advance_ticks(1)
    assert latched_count(pit, 0) == 65535
    assert pit.next_deadline() - clock.now == pytest.approx(65535 * NS / PIT_HZ, abs=2)


def test_latch_holds_value_while_time_passes(pit, clock):
    program(pit, 0, 2, 1000)
    clock.advance_ticks(100)
    pit.write(3, 1, 0x00)  # latch channel 0
    clock.advance_ticks(300)
    pit.write(3, 1, 0x00)  # a second latch before reading is ignored
    assert pit.read(0, 1) | pit.read(0, 1) << 8 == 900
    # After the latched value is read, reads are live again.
    assert pit.read(0, 1) | pit.read(0, 1) << 8 == 600


def test_read_back_status_and_count(pit, clock):
    program(pit, 2, 0, 1000)
    pit.write(3, 1, 0xC0 | 0x08)  # read-back: count and status of channel 2
    st = pit.read(2, 1)
    assert st & 0x3F == (3 << 4) | (0 << 1)  # word access, mode 0, binary
    assert not st & 0x80  # OUT low (gate low, not counted)
    assert pit.read(2, 1) | pit.read(2, 1) << 8 == 1000


def test_status_null_count_until_count_written(pit):
    pit.write(3, 1, 0x34)  # channel 0, word, mode 2
    assert status(pit, 0) & 0x40
    pit.write(0, 1, 0x10)
    pit.write(0, 1, 0x00)
    assert not status(pit, 0) & 0x40


def test_lsb_only_and_msb_only_access(pit, clock):
    program(pit, 0, 2, 0x80, access=1)
    assert pit.read(0, 1) == 0x80
    program(pit, 0, 2, 0x1200, access=2)
    clock.advance_ticks(0x100)
    assert pit.read(0, 1) == 0x11


def test_live_word_reads_alternate_low_high(pit, clock):
    # quick_pit_calibrate: mode 0 from 0xFFFF, then "inb(0x42); inb(0x42)" to read the MSB.
    pit.speaker.write(0, 1, 0x01)
    program(pit, 2, 0, 0xFFFF)
    clock.advance_ticks(0x300)
    pit.read(2, 1)
    assert pit.read(2, 1) == 0xFC
    clock.advance_ticks(0x100)
    pit.read(2, 1)
    assert pit.read(2, 1) == 0xFB


def test_channel2_gate_and_out2_on_port_61(pit, clock):
    # pit_calibrate_tsc: gate high, speaker off, channel 2 mode 0, poll bit 5 of 0x61.
    port61 = pit.speaker
    port61.write(0, 1, (port61.read(0, 1) & ~0x02) | 0x01)
    program(pit, 2, 0, 59659)  # 50 ms
    assert port61.read(0, 1) & 0x01
    assert not port61.read(0, 1) & 0x20
    clock.advance_ticks(59658)
    assert not port61.read(0, 1) & 0x20
    clock.advance_ticks(1)
    assert port61.read(0, 1) & 0x20


def test_gate_low_pauses_mode0(pit, clock):
    pit.speaker.write(0, 1, 0x01)
    program(pit, 2, 0, 1000)
    clock.advance_ticks(100)
    pit.speaker.write(0, 1, 0x00)  # gate low: counting stops
    clock.advance_ticks(5000)
    assert latched_count(pit, 2) == 900
    pit.speaker.write(0, 1, 0x01)
    clock.advance_ticks(100)
    assert latched_count(pit, 2) == 800


def test_gate_in_mode2_stops_and_reloads(pit, clock):
    pit.speaker.write(0, 1, 0x01)
    program(pit, 2, 2, 1000)
    clock.advance_ticks(300)
    pit.speaker.write(0, 1, 0x00)
    assert pit.out(2)  # gate low forces OUT high in mode 2
    clock.advance_ticks(300)
    pit.speaker.write(0, 1, 0x01)  # rising edge reloads
    assert latched_count(pit, 2) == 1000


def test_mode1_waits_for_gate_trigger(pit, clock):
    program(pit, 2, 1, 100)
    assert pit.out(2)
    clock.advance_ticks(500)
    assert latched_count(pit, 2) == 100
    pit.speaker.write(0, 1, 0x01)  # trigger
    assert not pit.out(2)
    clock.advance_ticks(100)
    assert pit.out(2)


def test_channel2_gate_starts_low(pit, clock):
    program(pit, 2, 0, 100)
    clock.advance_ticks(1000)
    assert latched_count(pit, 2) == 100  # no gate, no counting


def test_irq_is_only_channel0(pit, clock, irq):
    pit.speaker.write(0, 1, 0x01)
    program(pit, 2, 2, 100)
    program(pit, 1, 2, 100)
    assert pit.next_deadline() is None
    clock.advance_ticks(1000)
    pit.update()
    assert irq.edges == 0


def test_reprogramming_delivers_a_due_edge_first(pit, clock, irq):
    program(pit, 0, 2, 1193)
    clock.now = pit.next_deadline()
    program(pit, 0, 2, 2386)  # the edge that was due still reaches the PIC
    assert irq.edges == 1


def test_periodic_irq_rate_is_bounded(pit, clock, irq):
    program(pit, 0, 2, 2)  # 600 kHz requested
    for _ in range(5):
        clock.now = pit.next_deadline()
        pit.update()
    first = clock.now
    clock.now = pit.next_deadline()
    assert clock.now - first >= 200_000
    assert irq.edges == 5


def test_bcd_counting(pit, clock):
    pit.write(3, 1, 0x31 | (2 << 1))  # channel 0, word, mode 2, BCD
    pit.write(0, 1, 0x00)
    pit.write(0, 1, 0x10)  # 1000 decimal
    clock.advance_ticks(1)
    assert latched_count(pit, 0) == 0x0999


def test_refresh_bit_toggles(pit, clock):
    values = set()
    for _ in range(4):
        clock.now += 15_085
        values.add(pit.speaker.read(0, 1) & 0x10)
    assert values == {0, 0x10}


def test_garbage_does_not_crash(pit, clock, irq):
    for value in range(256):
        for port in range(4):
            pit.write(port, 1, value)
            pit.read(port, 1)
        pit.speaker.write(0, 1, value)
        pit.speaker.read(0, 1)
        clock.now += 7_777
        pit.update()
        deadline = pit.next_deadline()
        assert deadline is None or deadline > clock.now
