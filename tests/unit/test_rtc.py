"""The CMOS RTC: time registers in each format, UIP, status registers, setting the clock."""

from __future__ import annotations

import calendar

import pytest

from devices.rtc import (
    CENTURY,
    DAY_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    MINUTES,
    MONTH,
    SECONDS,
    STATUS_A,
    STATUS_B,
    STATUS_C,
    STATUS_D,
    YEAR,
    CmosRtc,
)

# Tuesday 2024-02-27 13:45:56.25 UTC
T0 = calendar.timegm((2024, 2, 27, 13, 45, 56, 0, 0, 0)) + 0.25


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, now: float = T0, **kwargs) -> None:
        self.clock = FakeClock(now)
        self.rtc = CmosRtc(clock=self.clock, **kwargs)

    def r(self, index: int) -> int:
        self.rtc.write(0, 1, index)
        return self.rtc.read(1, 1)

    def w(self, index: int, value: int) -> None:
        self.rtc.write(0, 1, index)
        self.rtc.write(1, 1, value)

    def datetime_bcd(self) -> tuple[int, ...]:
        return tuple(
            self.r(i) for i in (CENTURY, YEAR, MONTH, DAY_OF_MONTH, HOURS, MINUTES, SECONDS)
        )


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_time_in_bcd_24h_by_default(h: Harness) -> None:
    assert h.r(STATUS_B) == 0x02
    assert h.datetime_bcd() == (0x20, 0x24, 0x02, 0x27, 0x13, 0x45, 0x56)
    assert h.r(DAY_OF_WEEK) == 3  # Tuesday; Sunday is 1


def test_binary_mode(h: Harness) -> None:
    h.w(STATUS_B, 0x02 | 0x04)
    assert h.datetime_bcd() == (20, 24, 2, 27, 13, 45, 56)


@pytest.mark.parametrize(
    "hour,bcd,binary",
    [
        (0, 0x12, 12),
        (1, 0x01, 1),
        (11, 0x11, 11),
        (12, 0x92, 0x8C),
        (13, 0x81, 0x81),
        (23, 0x91, 0x8B),
    ],
)
def test_12_hour_mode_sets_bit7_for_pm(hour: int, bcd: int, binary: int) -> None:
    h = Harness(calendar.timegm((2024, 1, 1, hour, 0, 0, 0, 0, 0)))
    h.w(STATUS_B, 0x00)
    assert h.r(HOURS) == bcd
    h.w(STATUS_B, 0x04)
    assert h.r(HOURS) == binary


def test_index_ignores_the_nmi_mask_bit(h: Harness) -> None:
    h.rtc.write(0, 1, 0x80 | MINUTES)
    assert h.rtc.read(1, 1) == 0x45


def test_index_port_reads_as_all_ones(h: Harness) -> None:
    assert h.rtc.read(0, 1) == 0xFF


def test_time_follows_the_clock(h: Harness) -> None:
    h.clock.now += 65
    assert h.r(MINUTES) == 0x47
    assert h.r(SECONDS) == 0x01


def test_status_d_reports_valid_ram_and_time(h: Harness) -> None:
    assert h.r(STATUS_D) & 0x80


def test_status_c_has_no_interrupt_flags(h: Harness) -> None:
    assert h.r(STATUS_C) == 0


def test_status_a_default_and_uip_only_just_before_a_second(h: Harness) -> None:
    assert h.r(STATUS_A) == 0x26
    h.clock.now = int(T0) + 0.9999  # within 244 us of the update
    assert h.r(STATUS_A) == 0x80 | 0x26
    h.clock.now = int(T0) + 1.0001  # the update happened: clear again
    assert h.r(STATUS_A) == 0x26


def test_uip_is_read_only(h: Harness) -> None:
    h.w(STATUS_A, 0xA6)
    assert h.r(STATUS_A) == 0x26


def test_linux_read_sequence_terminates_with_a_consistent_time(h: Harness) -> None:
    # mc146818_avoid_UIP: read seconds, require UIP clear and seconds unchanged.
    h.clock.now = int(T0) + 0.99990  # start inside the UIP window
    waited = 0
    for _attempt in range(10):
        seconds = h.r(SECONDS)
        if h.r(STATUS_A) & 0x80:
            h.clock.now += 0.001
            waited += 1
            continue
        fields = h.datetime_bcd()
        if h.r(SECONDS) == seconds:
            break
    else:
        pytest.fail("UIP never cleared")
    assert waited == 1
    assert fields[-1] == seconds == 0x57


def test_guest_sets_the_clock_with_set_bit(h: Harness) -> None:
    h.w(STATUS_B, 0x80 | 0x02)
    for index, value in ((CENTURY, 0x19), (YEAR, 0x99), (MONTH, 0x12), (DAY_OF_MONTH, 0x31)):
        h.w(index, value)
    for index, value in ((HOURS, 0x23), (MINUTES, 0x59), (SECONDS, 0x58)):
        h.w(index, value)
    h.clock.now += 10  # updates are halted while SET is on
    assert h.r(SECONDS) == 0x58
    h.w(STATUS_B, 0x02)
    assert h.datetime_bcd() == (0x19, 0x99, 0x12, 0x31, 0x23, 0x59, 0x58)
    h.clock.now += 2
    assert h.datetime_bcd() == (0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00)


def test_setting_the_clock_does_not_touch_host_time_source(h: Harness) -> None:
    h.w(MINUTES, 0x00)  # without SET: takes effect at once
    assert h.r(MINUTES) == 0x00
    assert h.r(HOURS) == 0x13
    assert h.clock.now == T0


def test_impossible_date_is_ignored(h: Harness) -> None:
    h.w(MONTH, 0x13)
    assert h.r(MONTH) == 0x02
    h.w(STATUS_B, 0x82)
    h.w(DAY_OF_MONTH, 0x30)  # 30 February
    h.w(STATUS_B, 0x02)
    assert h.r(DAY_OF_MONTH) == 0x27


def test_binary_writes_in_12_hour_mode(h: Harness) -> None:
    h.w(STATUS_B, 0x04)  # binary, 12-hour
    h.w(HOURS, 0x80 | 3)  # 3 PM
    h.w(STATUS_B, 0x06)
    assert h.r(HOURS) == 15


def test_cmos_memory_bytes_are_kept(h: Harness) -> None:
    h.w(0x40, 0xAB)
    h.w(0x7F, 0xCD)
    assert (h.r(0x40), h.r(0x7F)) == (0xAB, 0xCD)


def test_status_c_and_d_are_read_only(h: Harness) -> None:
    h.w(STATUS_C, 0xFF)
    h.w(STATUS_D, 0x00)
    assert (h.r(STATUS_C), h.r(STATUS_D)) == (0, 0x80)


def test_memory_size_fields() -> None:
    h = Harness(low_memory=32 << 20, high_memory=1 << 30)
    assert h.r(0x15) | h.r(0x16) << 8 == 640
    assert h.r(0x17) | h.r(0x18) << 8 == 31 * 1024
    assert h.r(0x30) | h.r(0x31) << 8 == 31 * 1024
    assert h.r(0x34) | h.r(0x35) << 8 == (32 - 16) * 16
    assert h.r(0x5B) | h.r(0x5C) << 8 | h.r(0x5D) << 16 == (1 << 30) >> 16


def test_extended_memory_field_saturates() -> None:
    h = Harness(low_memory=3 << 30)
    assert h.r(0x17) | h.r(0x18) << 8 == 0xFFFF
