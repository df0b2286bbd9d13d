"""The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).

The clock shows the host's UTC time (from an injected clock, so tests choose
the time) plus an offset that the guest moves by writing the time registers,
so `hwclock --systohc` in a guest changes the guest's clock only. The time
registers are presented in the format status register B asks for: BCD or
binary (DM bit), 24-hour or 12-hour with bit 7 as PM.

Update-in-progress (UIP, status A bit 7): the real chip raises it for 244 us
before each once-a-second update, and promises that after reading UIP clear
the registers hold still for at least that long. pyvmm computes the registers
from the clock on every read, so it reports UIP exactly in that window before
each second boundary: never stuck, and Linux's read loop (read seconds, check
UIP, read the rest, re-read seconds) sees a consistent time.

The other CMOS bytes are plain memory, with the memory-size fields firmware
leaves there (as QEMU sets them) and the century at 0x32. Interrupts
(periodic, alarm, update-ended on IRQ 8) are not modelled: status C reads 0.

Register on the PIO bus at 0x70 with size 2.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from boot.acpi import aml
from devices.board import Board
from vmm.layout import MMIO_HOLE_START, KiB, MiB

INDEX_OFFSET = 0
DATA_OFFSET = 1

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
STATUS_A = 0x0A
STATUS_B = 0x0B
STATUS_C = 0x0C
STATUS_D = 0x0D
CENTURY = 0x32  # where ACPI's FADT and Linux look for it

TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
B_SET = 0x80  # guest is setting the clock: updates halted
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H  # BCD, 24-hour: what PC firmware leaves
D_VRT = 0x80  # valid RAM and time: the battery is fine

HOUR_PM = 0x80
UIP_WINDOW = 244e-6  # seconds before each update during which UIP reads 1

CMOS_SIZE = 128
INDEX_MASK = 0x7F  # bit 7 of the index port masks NMI on a PC; pyvmm ignores it


def _to_bcd(value: int) -> int:
    # A register holds two BCD digits. While SET freezes the clock a guest may
    # store a byte that is not BCD (0xFF decodes to 165); it reads back as its
    # last two digits rather than as a number wider than the register.
    value %= 100
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        low_memory: int = 0,
        high_memory: int = 0,
    ) -> None:
        """`clock` returns UTC seconds since the epoch; the memory sizes (bytes of
        RAM below and above 4 GiB) only fill the CMOS fields firmware would set."""
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[STATUS_A] = A_DEFAULT
        self._cmos[STATUS_B] = B_DEFAULT
        self._offset = 0.0  # guest time minus host time, in seconds
        self._frozen: dict[int, int] | None = None  # time fields while B.SET holds updates
        self._set_memory_fields(low_memory, high_memory)

    # Device protocol.

    def read(self, offset: int, size: int) -> int:
        if offset != DATA_OFFSET:
            return 0xFF  # the index port is write-only
        with self._lock:
            return self._read_register(self._index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX_OFFSET:
                self._index = value & INDEX_MASK
            elif offset == DATA_OFFSET:
                self._write_register(self._index, value)

    # Registers.

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._encode(index, self._time_fields()[index])
        if index == STATUS_A:
            return self._cmos[STATUS_A] | (A_UIP if self._update_imminent() else 0)
        if index == STATUS_C:
            return 0  # no interrupt flags: interrupts are not modelled
        if index == STATUS_D:
            return D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            self._write_time_field(index, value)
        elif index == STATUS_A:
            self._cmos[STATUS_A] = value & ~A_UIP  # UIP is read-only
        elif index == STATUS_B:
            self._write_status_b(value)
        elif index in (STATUS_C, STATUS_D):
            pass  # read-only
        else:
            self._cmos[index] = value

    def _write_status_b(self, value: int) -> None:
        was_set = self._cmos[STATUS_B] & B_SET
        if value & B_SET:
            value &= ~B_UIE  # the datasheet: setting SET clears UIE
            if not was_set:
                self._frozen = self._time_fields()
        elif was_set and self._frozen is not None:
            self._set_guest_time(self._frozen)  # updates resume from what the guest wrote
            self._frozen = None
        self._cmos[STATUS_B] = value

    def _write_time_field(self, index: int, value: int) -> None:
        if index == DAY_OF_WEEK:
            return  # derived from the date; nobody relies on writing it
        fields = self._frozen if self._frozen is not None else self._time_fields()
        fields[index] = self._decode(index, value)
        if self._frozen is None:
            self._set_guest_time(fields)  # no SET bit: takes effect at once

    # Time.

    def _guest_now(self) -> float:
        return self._clock() + self._offset

    def _update_imminent(self) -> bool:
        if self._cmos[STATUS_B] & B_SET:
            return False  # updates are halted
        now = self._guest_now()
        return now - int(now) >= 1.0 - UIP_WINDOW

    def _time_fields(self) -> dict[int, int]:
        if self._frozen is not None:
            return dict(self._frozen)
        t = time.gmtime(int(self._guest_now()))
        return {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            HOURS: t.tm_hour,
            DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday; tm_wday 0 = Monday
            DAY_OF_MONTH: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }

    def _set_guest_time(self, fields: dict[int, int]) -> None:
        """Move the offset so the clock reads `fields` now; ignore impossible dates."""
        import calendar  # here: a guest seldom sets the clock, and every start would pay for it

        year = fields[CENTURY] * 100 + fields[YEAR]
        month, day = fields[MONTH], fields[DAY_OF_MONTH]
        hour, minute, second = fields[HOURS], fields[MINUTES], fields[SECONDS]
        if not (
            1 <= year <= 9999
            and 1 <= month <= 12
            and 1 <= day <= calendar.monthrange(year, month)[1]
            and 0 <= hour <= 23
            and 0 <= minute <= 59
            and 0 <= second <= 59
        ):
            return  # the guest wrote garbage: keep the clock running as it was
        target = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        now = self._clock()
        # Keep the host's fraction of a second so the next tick comes a whole
        # second after the write, as when a guest sets the real chip.
        self._offset = target - int(now)

    def _encode(self, index: int, value: int) -> int:
        status_b = self._cmos[STATUS_B]
        pm = 0
        if index == HOURS and not status_b & B_24H:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        if not status_b & B_DM_BINARY:
            value = _to_bcd(value)
        return value | pm

    def _decode(self, index: int, value: int) -> int:
        status_b = self._cmos[STATUS_B]
        pm = False
        if index == HOURS and not status_b & B_24H:
            pm = bool(value & HOUR_PM)
            value &= ~HOUR_PM
        if not status_b & B_DM_BINARY:
            value = _from_bcd(value)
        if index == HOURS and not status_b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    # Memory-size fields, as PC firmware (and QEMU) leaves them.

    def _set_memory_fields(self, low_memory: int, high_memory: int) -> None:
        def put16(index: int, value: int) -> None:
            value = min(value, 0xFFFF)
            self._cmos[index] = value & 0xFF
            self._cmos[index + 1] = value >> 8

        put16(0x15, 640)  # base memory, KiB
        extended_kib = max(low_memory // KiB - 1024, 0)  # KiB above 1 MiB
        put16(0x17, extended_kib)
        put16(0x30, extended_kib)
        above_16m = max(low_memory - 16 * MiB, 0) // (64 * KiB)
        put16(0x34, above_16m)  # 64 KiB units above 16 MiB
        above_4g = min(high_memory // (64 * KiB), 0xFF_FFFF)  # 64 KiB units above 4 GiB
        self._cmos[0x5B] = above_4g & 0xFF
        self._cmos[0x5C] = (above_4g >> 8) & 0xFF
        self._cmos[0x5D] = above_4g >> 16


# -- where it sits ---------------------------------------------------------------------

RTC_PORT = 0x70  # CMOS index at 0x70, data at 0x71
RTC_IRQ = 8  # described, never raised (no alarm or periodic interrupts)


def plug(board: Board) -> CmosRtc:
    """The CMOS RTC, with the machine's memory sizes in its CMOS bytes."""
    low_ram = sum(r.size for r in board.memory.regions if r.guest_address < MMIO_HOLE_START)
    rtc = CmosRtc(low_memory=low_ram, high_memory=board.memory.size - low_ram)
    board.pio.register(RTC_PORT, 2, rtc, "rtc")
    board.acpi.append(aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(
            aml.io(RTC_PORT, RTC_PORT, 0x01, 2),
            aml.irq_no_flags(RTC_IRQ),
        )),
    ))
    return rtc
