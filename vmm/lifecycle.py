"""Stopping a running machine: who asked, with what exit status, and waking everyone.

Any thread (a vCPU hitting the debug-exit port, the console's Ctrl-A x, a
signal handler, a guest power-off) calls `request_stop`; the first request
wins and decides the exit status. Every vCPU is then kicked out of the guest
and the main thread, waiting in `wait`, wakes up.

The request also says who asked: the host (a signal, Ctrl-A x, --timeout,
gdb's kill, an output that is gone) or the guest (power-off, reset, panic,
its own exit status). Whether the guest's last output is waited for follows
from that, never from the status: a guest may end with any status, 124 and
130 included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class StopController:
    def __init__(self) -> None:
        self._event = threading.Event()
        # Re-entrant: the main thread's signal handlers call request_stop, and
        # a signal can arrive while the main thread is inside it already.
        self._lock = threading.RLock()
        self.status: int | None = None
        self.reason = ""
        self.by_host = False  # the host asked for the stop, not the guest
        self.stopping = False
        self._kickers: list[Callable[[], None]] = []

    def add_kicker(self, kick: Callable[[], None]) -> None:
        self._kickers.append(kick)

    def request_stop(self, status: int, reason: str = "", *, by_host: bool = False) -> None:
        """`by_host`: the host asks (the user, --timeout, a debugger, an output that is gone),
        rather than the guest ending itself."""
        with self._lock:
            if self.stopping:
                return
            self.status = status
            self.reason = reason
            self.by_host = by_host
            # Set before kicking: a vCPU that wakes up must see it.
            self.stopping = True
        for kick in self._kickers:
            kick()
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)
