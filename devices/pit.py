"""The 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.

Three 16-bit down-counters clocked at 1.193182 MHz. Channel 0's output is
ISA IRQ0 (the classic timer tick); channel 1 once refreshed DRAM and is only
readable here; channel 2's gate and output reach software through port 0x61
(system control port B), which Linux uses to calibrate the TSC: it raises the
gate, programs channel 2 in mode 0 and either polls OUT2 (bit 5 of 0x61) or
reads the counter until it has run down.

Nothing ticks. Each channel remembers when it started counting, and the
counter, the OUT pin and the next IRQ0 edge are computed from the injected
clock when someone asks, the way QEMU does it. The machine's scheduler asks
`next_deadline()` when it wants to sleep and calls `update(now)` to deliver
the IRQ0 edges that are due; reads and writes also deliver due edges first, so
no edge is lost when the guest reprograms a channel.

Modes 0-5 are modelled (0: interrupt on terminal count, 1: hardware one-shot,
2: rate generator, 3: square wave, 4: software strobe, 5: hardware strobe),
with counter latch, read-back (count and status), LSB/MSB/word access and BCD.
Simplifications: a new count written without a control word takes effect at
once (the 8254 waits for the end of the period in modes 2 and 3), and the
IRQ0 edges of the periodic modes are spaced at least 200 us apart (as KVM's
PIT does), so a guest cannot make the VMM spin on a 1 MHz interrupt.

Not thread-safe on its own; the interrupt router serialises access.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from devices.log_once import LogOnce
from vmm.bus import IrqLine

log = logging.getLogger(__name__)

PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000
MIN_PERIODIC_IRQ_NS = 200_000

# Access modes from bits 5-4 of the control word.
_LATCH, _LSB, _MSB, _WORD = range(4)

# Port 0x61 bits.
SPEAKER_GATE2 = 0x01
SPEAKER_WRITABLE = 0x0F  # gate 2, speaker data, parity/IOCHK check disables
SPEAKER_REFRESH = 0x10
SPEAKER_OUT2 = 0x20
REFRESH_TOGGLE_NS = 15_085  # the DRAM refresh request bit flips every ~15 us


def _ticks_to_ns(ticks: int) -> int:
    return -(-ticks * NS_PER_S // PIT_HZ)  # rounded up: the tick has happened by then


def _from_bcd(value: int) -> int:
    # Nibbles above 9 are not BCD; read them as 9 rather than let a count exceed 9999.
    return sum(min((value >> (4 * i)) & 0xF, 9) * 10**i for i in range(4))


def _to_bcd(value: int) -> int:
    return sum(((value // 10**i) % 10) << (4 * i) for i in range(4))


class PitChannel:
    """One counter. Time is counted in PIT ticks since the counter was loaded."""

    def __init__(self, index: int, gate: bool) -> None:
        self.index = index
        self.gate = gate
        self.mode = 0
        self.access = _WORD
        self.bcd = False
        self.count = 0x10000  # the reload value N; a written 0 means 65536 (10000 in BCD)
        self.loaded = False  # a count has been written since the last control word
        self.triggered = False  # modes 1 and 5: a gate edge has started the count
        self.null_count = True
        self._ticks_before = 0  # ticks counted before the current run
        self._running_since: int | None = None  # clock time the current run started
        self._write_high_next = False
        self._pending_low = 0
        self._read_high_next = False
        self._latched: list[int] = []  # bytes waiting to be read, oldest first
        self._status: int | None = None

    # -- time --------------------------------------------------------------------

    def ticks(self, now: int) -> int:
        if self._running_since is None:
            return self._ticks_before
        return self._ticks_before + (now - self._running_since) * PIT_HZ // NS_PER_S

    def _start(self, now: int) -> None:
        self._ticks_before = 0
        self._running_since = now

    def _pause(self, now: int) -> None:
        self._ticks_before = self.ticks(now)
        self._running_since = None

    def _resume(self, now: int) -> None:
        self._running_since = now

    @property
    def counting(self) -> bool:
        return self._running_since is not None

    def _modulus(self) -> int:
        return 10_000 if self.bcd else 0x10000

    def _period(self) -> int:
        # Modes 2 and 3 cannot divide by one; treat it as two rather than stall.
        return max(self.count, 2)

    # -- outputs -----------------------------------------------------------------

    def counter(self, now: int) -> int:
        """The value a read of the counting element returns, before BCD encoding."""
        if not self.loaded or (self.mode in (1, 5) and not self.triggered):
            return self.count % self._modulus()
        t = self.ticks(now)
        if self.mode == 2:
            n = self._period()
            value = n - t % n
        elif self.mode == 3:
            n = self._period()
            value = n - (2 * t) % n
        else:
            value = self.count - t
        return value % self._modulus()

    def out(self, now: int) -> bool:
        if not self.loaded:
            return self.mode != 0  # the control word sets OUT low in mode 0, high otherwise
        if self.mode in (1, 5) and not self.triggered:
            return True
        if self.mode in (2, 3) and not self.gate:
            return True
        t = self.ticks(now)
        if self.mode in (0, 1):
            return t >= self.count
        if self.mode in (4, 5):
            return t != self.count
        n = self._period()
        if self.mode == 2:
            return t % n != n - 1
        return t % n < (n + 1) // 2

    def next_rising_edge(self, now: int) -> int | None:
        """Clock time of the first rising edge of OUT after `now`, or None."""
        if not self.loaded or not self.counting:
            return None
        t = self.ticks(now)
        if self.mode in (0, 1):
            edge = self.count if t < self.count else None
        elif self.mode in (4, 5):
            edge = self.count + 1 if t < self.count + 1 else None
        else:
            n = self._period()
            edge = (t // n + 1) * n
        if edge is None:
            return None
        assert self._running_since is not None
        return self._running_since + _ticks_to_ns(edge - self._ticks_before)

    # -- programming -------------------------------------------------------------

    def control(self, access: int, mode: int, bcd: bool) -> None:
        self.access = access
        self.mode = mode if mode < 6 else mode - 4  # modes 6 and 7 are aliases of 2 and 3
        self.bcd = bcd
        self.loaded = False
        self.triggered = False
        self.null_count = True
        self._running_since = None
        self._ticks_before = 0
        self._write_high_next = False
        self._read_high_next = False
        self._latched.clear()
        self._status = None

    def write_count(self, byte: int, now: int) -> None:
        if self.access == _LSB:
            self._load(byte, now)
        elif self.access == _MSB:
            self._load(byte << 8, now)
        elif not self._write_high_next:
            self._pending_low = byte
            self._write_high_next = True
        else:
            self._write_high_next = False
            self._load(self._pending_low | byte << 8, now)

    def _load(self, raw: int, now: int) -> None:
        value = _from_bcd(raw) if self.bcd else raw
        self.count = value or self._modulus()
        self.loaded = True
        self.null_count = False
        if self.mode in (1, 5):
            self.triggered = False  # waits for a rising edge on the gate
            self._running_since = None
            self._ticks_before = 0
        elif self.gate:
            self._start(now)
        else:
            self._ticks_before = 0
            self._running_since = None

    def set_gate(self, high: bool, now: int) -> None:
        if high == self.gate:
            return
        self.gate = high
        if not self.loaded:
            return
        if self.mode in (0, 4):
            # The gate suspends counting; the count resumes where it stopped.
            if high:
                self._resume(now)
            else:
                self._pause(now)
        elif self.mode in (1, 5):
            if high:  # a rising edge (re)triggers the count
                self.triggered = True
                self._start(now)
        elif high:  # modes 2 and 3: a rising edge reloads, low stops the count
            self._start(now)
        else:
            self._pause(now)

    def latch_count(self, now: int) -> None:
        if self._latched:
            return  # a second latch before the first is read is ignored
        value = self.counter(now)
        if self.bcd:
            value = _to_bcd(value)
        if self.access == _LSB:
            self._latched = [value & 0xFF]
        elif self.access == _MSB:
            self._latched = [value >> 8]
        else:
            self._latched = [value & 0xFF, value >> 8]

    def latch_status(self, now: int) -> None:
        if self._status is not None:
            return
        self._status = (
            (0x80 if self.out(now) else 0)
            | (0x40 if self.null_count else 0)
            | self.access << 4
            | self.mode << 1
            | int(self.bcd)
        )

    def read_byte(self, now: int) -> int:
        if self._status is not None:
            status, self._status = self._status, None
            return status
        if self._latched:
            return self._latched.pop(0)
        value = self.counter(now)
        if self.bcd:
            value = _to_bcd(value)
        if self.access == _LSB:
            return value & 0xFF
        if self.access == _MSB:
            return value >> 8
        # Word access without a latch reads the live counter, one byte per read.
        high, self._read_high_next = self._read_high_next, not self._read_high_next
        return value >> 8 if high else value & 0xFF


class Pit:
    """The 8254 at ports 0x40-0x43 (offsets 0-3). Channel 0's OUT drives `irq0`."""

    def __init__(self, irq0: IrqLine, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._irq0 = irq0
        self.clock = clock
        self._odd = LogOnce(log, "8254 PIT")
        # Channels 0 and 1 have their gates tied high; channel 2's is port 0x61 bit 0.
        self.channels = [PitChannel(0, True), PitChannel(1, True), PitChannel(2, False)]
        self._deadline: int | None = None
        self._last_irq: int | None = None
        self.speaker = SpeakerPort(self)

    # -- timers ------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """Clock time of the next IRQ0 edge, or None if channel 0 will not raise one."""
        return self._deadline

    def update(self, now: int | None = None) -> None:
        """Deliver the IRQ0 edge if it is due. Edges missed while nobody looked coalesce
        into one, as an edge-triggered PIC input would see them."""
        if now is None:
            now = self.clock()
        if self._deadline is not None and now >= self._deadline:
            self._irq0.pulse()
            self._last_irq = now
            self._rearm(now)

    def _rearm(self, now: int) -> None:
        channel = self.channels[0]
        deadline = channel.next_rising_edge(now)
        if deadline is not None and channel.mode in (2, 3) and self._last_irq is not None:
            deadline = max(deadline, self._last_irq + MIN_PERIODIC_IRQ_NS)
        self._deadline = deadline

    # -- ports -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        now = self.clock()
        self.update(now)
        if 0 <= offset < 3:
            return self.channels[offset].read_byte(now)
        return 0xFF  # the control word register cannot be read

    def write(self, offset: int, size: int, value: int) -> None:
        now = self.clock()
        self.update(now)
        value &= 0xFF
        if 0 <= offset < 3:
            self.channels[offset].write_count(value, now)
        elif offset == 3:
            self._control_word(value, now)
        else:
            return
        self._rearm(now)

    def _control_word(self, value: int, now: int) -> None:
        select = value >> 6
        if select == 3:
            self._read_back(value, now)
            return
        channel = self.channels[select]
        access = (value >> 4) & 3
        if access == _LATCH:
            channel.latch_count(now)
            return
        if value & 1:
            self._odd("bcd", "BCD counting requested on channel %d", select)
        channel.control(access, (value >> 1) & 7, bool(value & 1))
        if select == 0:
            self._last_irq = None  # a reprogrammed channel 0 starts a fresh period

    def _read_back(self, value: int, now: int) -> None:
        # Bits 3-1 select channels 2-0; bit 5 clear latches counts, bit 4 clear latches status.
        for index in range(3):
            if value & (2 << index):
                channel = self.channels[index]
                if not value & 0x10:
                    channel.latch_status(now)
                if not value & 0x20:
                    channel.latch_count(now)

    def set_gate(self, index: int, high: bool) -> None:
        now = self.clock()
        self.update(now)
        self.channels[index].set_gate(high, now)
        self._rearm(now)

    def out(self, index: int) -> bool:
        return self.channels[index].out(self.clock())


class SpeakerPort:
    """Port 0x61, system control port B: channel 2's gate and output, the speaker enable.

    Read: bit 0 gate 2, bit 1 speaker data, bits 2-3 as written, bit 4 the
    DRAM refresh toggle, bit 5 OUT2; the NMI status bits 6-7 read 0 (no parity
    or I/O channel errors on a virtual machine).
    """

    def __init__(self, pit: Pit) -> None:
        self._pit = pit
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        now = self._pit.clock()
        value = self._value
        if (now // REFRESH_TOGGLE_NS) & 1:
            value |= SPEAKER_REFRESH
        if self._pit.channels[2].out(now):
            value |= SPEAKER_OUT2
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self._value = value & SPEAKER_WRITABLE
        self._pit.set_gate(2, bool(value & SPEAKER_GATE2))


# Where it sits (when emulated: KVM's in-kernel PIT answers these itself).
PORT = 0x40  # 4 ports: channels 0-2, control word
PORT_B = 0x61  # system control port B: channel 2's gate and output, the speaker
