"""The I/O thread: one selectors loop serving every virtio device's file descriptors.

What it waits on: queue-notification eventfds (KVM ioeventfd) and the host
side of backends (a TAP device, a unix socket). Each fd has a callback run on this thread; callbacks take
the device's own lock, so the vCPU threads and this one never work on one
device at the same time.

Other threads change the set of fds through `call_soon`, which queues the
change and wakes the loop through an eventfd: only the loop thread touches
its selector. `call_later` runs work on the loop thread after a delay (a
device deciding something once the guest has had time to act). A callback
that raises is logged and the loop carries on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], object]


class IoLoop:
    def __init__(self, name: str = "virtio-io") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, (self._drain_wake, None))
        self._handlers: dict[int, list[Callback | None]] = {}  # fd -> [on readable, on writable]
        self._calls: deque[Callback] = deque()
        # (when, order, work) by time.monotonic(); order keeps equal times first come, first run.
        self._timers: list[tuple[float, int, Callback]] = []
        self._timer_order = itertools.count()
        self._calls_lock = threading.Lock()  # guards _calls and _timers
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- from any thread ----------------------------------------------------------

    def call_soon(self, work: Callback) -> None:
        with self._calls_lock:
            self._calls.append(work)
        self._wake()

    def time(self) -> float:
        """The clock `call_later` counts on (time.monotonic)."""
        return time.monotonic()

    def call_later(self, delay: float, work: Callback) -> None:
        """Run `work` on the loop thread `delay` seconds from now (or later, never sooner)."""
        with self._calls_lock:
            heapq.heappush(self._timers, (self.time() + delay, next(self._timer_order), work))
        if threading.current_thread() is not self._thread:
            self._wake()  # the loop may be sleeping past the new deadline

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._change(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._change(fd, 0, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._change(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._change(fd, 1, None)

    def _change(self, fd: int, which: int, callback: Callback | None) -> None:
        if self._thread is None or threading.current_thread() is self._thread:
            self._apply(fd, which, callback)
        else:
            self.call_soon(lambda: self._apply(fd, which, callback))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; the fds stay open (their owners close them)."""
        self._stopping = True
        if self._thread is not None:
            self._wake()
            if self._thread is not threading.current_thread():
                self._thread.join(5.0)
        if self._wake_fd >= 0 and (self._thread is None or not self._thread.is_alive()):
            self._selector.close()
            os.close(self._wake_fd)
            self._wake_fd = -1

    # -- on the loop thread ------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):
            pass  # the counter is saturated (already woken) or the loop is gone

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def _apply(self, fd: int, which: int, callback: Callback | None) -> None:
        handlers = self._handlers.setdefault(fd, [None, None])
        handlers[which] = callback
        events = (selectors.EVENT_READ if handlers[0] else 0) | (selectors.EVENT_WRITE if handlers[1] else 0)
        registered = fd in self._selector.get_map()
        if not events:
            del self._handlers[fd]
            if registered:
                self._selector.unregister(fd)
        elif registered:
            self._selector.modify(fd, events)
        else:
            self._selector.register(fd, events)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._selector.select(self._time_to_next_timer()):
                if key.fd == self._wake_fd:
                    self._drain_wake()
                    continue
                handlers = self._handlers.get(key.fd)
                if handlers is None:
                    continue
                if mask & selectors.EVENT_READ and handlers[0] is not None:
                    self._safely(handlers[0])
                if mask & selectors.EVENT_WRITE and handlers[1] is not None:
                    self._safely(handlers[1])
            while True:
                with self._calls_lock:
                    if not self._calls:
                        break
                    work = self._calls.popleft()
                self._safely(work)
            self._run_due_timers()

    def _time_to_next_timer(self) -> float | None:
        with self._calls_lock:
            return max(self._timers[0][0] - self.time(), 0.0) if self._timers else None

    def _run_due_timers(self) -> None:
        now = self.time()
        while True:
            with self._calls_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                work = heapq.heappop(self._timers)[2]
            self._safely(work)

    def _safely(self, work: Callback) -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 - one device's failure must not stop the others' I/O
            log.exception("%s: callback failed", self.name)
