"""One software CPU, many vCPUs: who runs guest code right now.

All vCPUs of a software-CPU VM share ONE Unicorn engine (one translation
cache, one set of memory mappings) and take turns on it, the way QEMU's
single-threaded TCG runs all its vCPUs round robin:

- guest atomics stay atomic, because only one vCPU executes at a time;
- code written by one vCPU (module loading, alternatives, text_poke) is seen
  by the others: QEMU invalidates translated blocks on writes made through
  its own engine, which would not happen across separate engines;
- the kernel is translated once, not once per vCPU.

Each vCPU keeps its architectural state in its own saved context; the vCPU
that gets the CPU has its context restored into the engine (plus a TLB
flush, since the TLB belongs to the previous vCPU's address space).

The exit loop still runs one host thread per vCPU and calls `vcpu.run()` as
it does on KVM. A thread that wants to run guest code `acquire`s the CPU,
runs a slice, and `release`s it to the next thread waiting, in arrival
order. Device accesses therefore still happen on the accessing vCPU's own
thread, as on KVM, just never two at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmm.tcg.engine import Engine
    from vmm.tcg.qemu_env import ContextBuffer

# How long a vCPU may keep the CPU while another waits for it (QEMU's round-robin
# TCG uses 100 ms; shorter keeps IPIs between vCPUs answered quickly).
SLICE_NS = 5_000_000


class CpuScheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        # The vCPU that owns the CPU: while guest code runs, the one running it,
        # so the engine's hooks hand their events to `owner`.
        self.owner = None
        self._queue: deque = deque()
        self._live_context: ContextBuffer | None = None
        self.owner_since = 0  # time.monotonic_ns() when the owner got the CPU
        self.on_contention = None  # called (lock held) when a thread starts waiting for the CPU

    def condition(self) -> threading.Condition:
        """A condition on the scheduler's lock, for one vCPU thread to sleep on."""
        return threading.Condition(self.lock)

    @property
    def contended(self) -> bool:
        return bool(self._queue)

    def acquire(self, who, turn: threading.Condition, give_up) -> bool:
        """Block until `who` owns the CPU; False if `give_up()` became true while waiting.

        `give_up` is evaluated with the lock held; whoever makes it true must
        notify `turn` (also with the lock held).
        """
        with self.lock:
            if self.owner is None and not self._queue:
                self._take(who)
                return True
            self._queue.append(who)
            if self.on_contention is not None:
                self.on_contention()
            while self.owner is not who:
                if give_up():
                    self._queue.remove(who)
                    return False
                turn.wait()
            return True

    def release(self, who) -> None:
        with self.lock:
            if self.owner is not who:
                raise RuntimeError("releasing a CPU that is not owned")
            self.owner = None
            if self._queue:
                successor = self._queue.popleft()
                self._take(successor)
                successor.turn.notify()

    def _take(self, who) -> None:
        self.owner = who
        self.owner_since = time.monotonic_ns()

    def make_live(self, context: ContextBuffer) -> None:
        """Put a vCPU's saved state into the engine (the caller owns the CPU)."""
        if self._live_context is context:
            return
        if self._live_context is not None:
            self._live_context.save()
        context.restore()
        self.engine.flush_tlb()
        self._live_context = context

    def forget(self, context: ContextBuffer) -> None:
        if self._live_context is context:
            self._live_context = None
