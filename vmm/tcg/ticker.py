"""The alarm clock of a software-CPU VM: ends the running vCPU's slice when it must.

Guest code runs until something stops `emu_start`. Two things must, even in
a guest that never exits on its own:

- a timer interrupt falls due (the PIT, a local APIC timer);
- another vCPU is waiting for the CPU and the slice is used up.

(An interrupt the guest cannot take yet stops the slice when it can: the stop
hook watches for the window, vmm/tcg/stop_hook.py.)

The vCPU arms the ticker with the earliest of these when its slice starts
(and again when a device write moves a timer earlier); the ticker thread
sleeps until then and requests the stop through the stop hook, which stops
emulation on the emulating thread itself. The ticker never touches Unicorn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Ticker:
    def __init__(self, request_stop: Callable[[], None]) -> None:
        self._request_stop = request_stop
        self._cond = threading.Condition()
        self._stop_at: int | None = None  # time.monotonic_ns()
        self._waking_at: int | None = None  # when the ticker thread wakes by itself (None: never)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="tcg-ticker", daemon=True)
        self._thread.start()

    def arm(self, when_ns: int) -> None:
        """Stop the running vCPU at `when_ns` at the latest (an earlier alarm stays)."""
        with self._cond:
            if self._stop_at is None or when_ns < self._stop_at:
                self._stop_at = when_ns
                # Slices re-arm the same timer deadline over and over: wake the
                # thread only when it would sleep past the new alarm.
                if self._waking_at is None or when_ns < self._waking_at:
                    self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._stop_at = None

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        with self._cond:
            while not self._closing:
                if self._stop_at is None:
                    self._waking_at = None
                    self._cond.wait()
                    continue
                delay = self._stop_at - time.monotonic_ns()
                if delay > 0:
                    self._waking_at = self._stop_at
                    self._cond.wait(delay / 1e9)
                    continue
                self._stop_at = None
                self._request_stop()
