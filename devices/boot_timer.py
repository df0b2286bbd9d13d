"""The boot-timer port: the guest marks "userspace reached".

The test initramfs writes one byte to port 0x520 (`PORT`) through
`/dev/port` as soon as init runs. The first write records how long it took
since pyvmm started; `--stats` prints it and `make bench` compares it with
QEMU. Later writes are counted and otherwise ignored, so a guest that writes
twice cannot move the mark.

Times come from an injected clock, so tests need no sleeping; by default the
clock is CLOCK_BOOTTIME, the clock `process_start_time()` can read the
process's own start on, so the figure includes interpreter start-up and
imports: what a user waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from devices.board import Board


def boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start_time() -> float:
    """When this process started, on the `boot_clock()` scale (10 ms resolution).

    Read from /proc/self/stat (field 22, clock ticks since boot), so it is
    right even when called late; falls back to "now" if /proc is unreadable.
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # After the ")" of the command name, field 3 is fields[0]; starttime is field 22.
        return int(fields[22 - 3]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return boot_clock()


class BootTimer:
    def __init__(
        self,
        start: float,
        *,
        clock: Callable[[], float] = boot_clock,
        on_mark: Callable[[float], None] | None = None,
    ) -> None:
        self._start = start
        self._clock = clock
        self._on_mark = on_mark
        self.elapsed: float | None = None  # seconds from start to the first write
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        if self.elapsed is not None:
            return
        self.elapsed = self._clock() - self._start
        if self._on_mark is not None:
            self._on_mark(self.elapsed)


# -- where it sits --------------------------------------------------------------------

PORT = 0x520  # 0x510 is QEMU's fw_cfg: keep clear of it


def plug(board: Board) -> BootTimer:
    """The mark lands in `board.userspace_reached`, for --stats."""
    def reached(seconds: float) -> None:
        board.userspace_reached = seconds

    timer = BootTimer(board.started, on_mark=reached)
    board.pio.register(PORT, 1, timer, "boot-timer")
    return timer
