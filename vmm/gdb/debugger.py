"""The VM side of the gdb stub: all-stop control of the vCPU threads, and `Target` on top.

Each vCPU thread runs the exit loop (vmm/vcpu_thread.py). It comes here on
two exits only, so a VM without a debugger pays nothing:

- `Interrupted` (it was kicked): if the debugger is stopping the VM, the
  thread parks here until gdb resumes it;
- `DebugTrap` (a step, breakpoint or watchpoint): the first one since the
  last resume becomes the stop gdb hears about, every other vCPU is kicked,
  and the thread parks.

While parked, a vCPU thread runs the requests the gdb thread queues for it
(read registers, set its debug state), so every vCPU ioctl is made by the
vCPU's own thread, as KVM's API document asks. When the last vCPU parks,
`wake_fd` tells the gdb thread that a stop is ready to report.

Memory is read and written through the stopped vCPU's page tables
(vmm/paging.py), as QEMU's gdbstub does on either accelerator; only RAM is
reachable (a device's registers are never touched by a debugger read).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable

from vmm.accel import Vcpu, VirtualMachine
from vmm.errors import GuestMemoryError, PyvmmError
from vmm.exits import DebugTrap
from vmm.gdb.target import MemoryFault, Refused, StopEvent, Target
from vmm.guest_debug import ACCESS, BREAK, READ, WRITE, DebugPoint, GuestDebug
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory
from vmm.paging import PageFault, PagingMode, translate

log = logging.getLogger(__name__)

INT3 = b"\xcc"
PAGE = 0x1000
# DebugTrap kinds as gdb's stop reasons (vmm/gdb/session.py).
_REASONS = {"step": "step", "int3": "swbreak", WRITE: "watch", READ: "rwatch", ACCESS: "awatch"}
_WATCH_KINDS = {"write": WRITE, "read": READ, "access": ACCESS}


class _Request:
    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


class Debugger(Target):
    def __init__(self, vm: VirtualMachine, vcpus: list[Vcpu], memory: GuestMemory, stop: StopController,
                 paused: bool) -> None:
        support = vm.debug_support()
        if support is None:
            raise PyvmmError("this accelerator offers no debugging support (KVM_CAP_SET_GUEST_DEBUG)")
        self.support = support
        self.vcpus = vcpus
        self.memory = memory
        self.stop_controller = stop
        self._cond = threading.Condition()
        self._running = True  # vCPUs may run; False while stopping or stopped
        self._parked: set[int] = set()
        self._released: set[int] = set()  # parked vCPUs told to leave
        self._requests: dict[int, deque[_Request]] = {v.index: deque() for v in vcpus}
        self._event: StopEvent | None = None
        self._reported = True  # the current stop was handed to take_stop()
        self._ended: int | None = None  # the VM's exit status once it stopped
        # Breakpoints by (kind, address, length): kind is "software", "hardware" or a watch kind.
        self._points: list[tuple[str, int, int]] = []
        self._int3_saved: dict[int, tuple[int, bytes]] = {}  # address -> (physical, original byte)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        stop.add_kicker(self._vm_stopping)
        self.paused_at_start = paused
        if paused:
            # -S: every vCPU parks before its first instruction (its first run() is Interrupted).
            self._running = False
            self._event = StopEvent(1, "stopped")
            for vcpu in vcpus:
                vcpu.kick()

    def close(self) -> None:
        with self._cond:
            os.close(self.wake_fd)
            self.wake_fd = -1  # a late vCPU thread must not write to a reused descriptor

    def _wake_gdb_thread(self) -> None:
        """Lock held."""
        if self.wake_fd >= 0:
            os.eventfd_write(self.wake_fd, 1)

    # -- on the vCPU threads (vmm/vcpu_thread.py) ------------------------------------------

    def interrupted(self, vcpu: Vcpu) -> None:
        with self._cond:
            if self._running:
                return  # an ordinary kick
        self._park(vcpu)

    def trapped(self, vcpu: Vcpu, trap: DebugTrap) -> None:
        reason = _REASONS.get(trap.kind)
        if reason is None:  # an instruction breakpoint: which kind gdb set there
            software = any(k == "software" and a == trap.address for k, a, _ in self._points)
            reason = "swbreak" if software else "hwbreak"
        self._halt(StopEvent(vcpu.index + 1, reason, trap.address))
        self._park(vcpu)

    def _park(self, vcpu: Vcpu) -> None:
        index = vcpu.index
        with self._cond:
            self._parked.add(index)
            if len(self._parked) == len(self.vcpus):
                self._all_stopped()
            self._cond.notify_all()
            while index not in self._released and not self.stop_controller.stopping:
                requests = self._requests[index]
                if requests:
                    request = requests.popleft()
                    self._cond.release()
                    try:
                        request.result = request.work()
                    except BaseException as err:  # noqa: BLE001 - handed to the waiting gdb thread
                        request.error = err
                    finally:
                        self._cond.acquire()
                        request.done.set()
                    continue
                self._cond.wait()
            self._released.discard(index)
            self._parked.discard(index)

    def _all_stopped(self) -> None:
        """The last vCPU parked (lock held): take the int3s out, tell the gdb thread."""
        self._remove_int3()
        if self._event is not None and not self._reported:
            self._wake_gdb_thread()

    # -- stopping and resuming -----------------------------------------------------------

    def _halt(self, event: StopEvent) -> None:
        with self._cond:
            if not self._running:
                return  # stopping already: the first reason stands
            self._running = False
            self._released.clear()
            self._event = event
            self._reported = False
            running = [v for v in self.vcpus if v.index not in self._parked]
        for vcpu in running:
            vcpu.kick()

    def interrupt(self) -> None:
        """gdb's Ctrl-C: stop everything; the stop is reported through wake_fd."""
        self._halt(StopEvent(1, "interrupt"))

    def stop(self) -> StopEvent:
        self._halt(StopEvent(1, "stopped"))
        with self._cond:
            while len(self._parked) < len(self.vcpus) and not self.stop_controller.stopping:
                self._cond.wait()
            self._reported = True
            return self._event

    def take_stop(self) -> StopEvent | None:
        """The stop to report, once every vCPU is parked; or the VM's end."""
        with self._cond:
            if self._ended is not None:
                return StopEvent(1, "exited", exit_status=self._ended)
            if self._reported or self._running or len(self._parked) < len(self.vcpus):
                return None
            self._reported = True
            return self._event

    def resume(self, actions: dict[int, str]) -> None:
        self._insert_int3(actions)
        # Each vCPU's debug state is set on its own thread while every vCPU is still
        # parked: the software CPU's hooks are shared by all of them.
        for vcpu in self.vcpus:
            debug = self._guest_debug(actions.get(vcpu.index + 1))
            self._on_vcpu(vcpu.index + 1, lambda vcpu=vcpu, debug=debug: vcpu.set_guest_debug(debug))
        with self._cond:
            self._running = True
            self._event = None
            self._released = {thread - 1 for thread in actions}
            self._cond.notify_all()

    def detach(self) -> None:
        """gdb went away (detached, or vanished while the guest ran): forget every breakpoint,
        and let all vCPUs run without any debug state."""
        self._points.clear()
        try:
            self.stop()  # a no-op when stopped; otherwise nothing may trap while the state goes
            self.resume(dict.fromkeys(self.threads(), "c"))
        except Refused:
            pass  # the VM is stopping: nothing to resume

    def _vm_stopping(self) -> None:
        """A StopController kicker: the VM is ending; wake parked vCPUs and the gdb thread."""
        with self._cond:
            self._ended = self.stop_controller.status
            self._cond.notify_all()
            self._wake_gdb_thread()

    def _guest_debug(self, action: str | None) -> GuestDebug:
        """What a vCPU resumed with `action` ("c", "s" or None: stays stopped) must watch for."""
        points = tuple(DebugPoint(BREAK if kind in ("software", "hardware") else _WATCH_KINDS[kind], address,
                                  length)
                       for kind, address, length in self._points
                       if not (kind == "software" and self.support.int3))
        return GuestDebug(step=action == "s", points=points,
                          int3_at=frozenset(self._int3_saved))

    # -- software breakpoints written into guest code (KVM) ------------------------------------

    def _insert_int3(self, actions: dict[int, str]) -> None:
        if not self.support.int3:
            return
        thread = next(iter(actions), 1)
        for kind, address, _ in self._points:
            if kind == "software" and address not in self._int3_saved:
                try:
                    physical = self._translate(self._paging(thread), address)
                    self._int3_saved[address] = (physical, self.memory.read(physical, 1))
                    self.memory.write(physical, INT3)
                except (PageFault, GuestMemoryError, Refused):
                    log.info("gdb: breakpoint at %#x is not mapped now; not inserted", address)

    def _remove_int3(self) -> None:
        for physical, original in self._int3_saved.values():
            self.memory.write(physical, original)
        self._int3_saved.clear()

    # -- Target: what gdb reads and changes while everything is stopped -------------------------

    def threads(self) -> list[int]:
        return [vcpu.index + 1 for vcpu in self.vcpus]

    def _on_vcpu(self, thread: int, work: Callable[[], object]) -> object:
        """Run `work` on the thread of parked vCPU `thread` and return its result."""
        index = thread - 1
        request = _Request(work)
        with self._cond:
            if index not in self._parked or index in self._released:
                raise Refused(f"vCPU {index} is not stopped")
            self._requests[index].append(request)
            self._cond.notify_all()
        while not request.done.wait(0.5):
            if self.stop_controller.stopping:
                raise Refused("the VM is stopping")
        if isinstance(request.error, PyvmmError):
            raise Refused(str(request.error))
        if request.error is not None:
            raise request.error
        return request.result

    def _vcpu(self, thread: int) -> Vcpu:
        return self.vcpus[thread - 1]

    def registers(self, thread: int) -> dict[str, int | None]:
        return self._on_vcpu(thread, self._vcpu(thread).debug_registers)

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        if values:
            vcpu = self._vcpu(thread)
            self._on_vcpu(thread, lambda: vcpu.write_debug_registers(values))

    def _paging(self, thread: int) -> PagingMode:
        regs = self.registers(thread)
        return PagingMode(regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"])

    def _translate(self, mode: PagingMode, address: int, length: int = 1) -> int:
        if mode.long and mode.enabled and (address >> 47) not in (0, 0x1FFFF):
            raise PageFault(address, 0)  # not canonical: the CPU would fault on it too
        physical = translate(self.memory, mode, address)
        if not self.memory.contains(physical, length):
            raise GuestMemoryError(f"no RAM at {physical:#x}")
        return physical

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        mode = self._paging(thread)
        out = bytearray()
        while length:
            chunk = min(length, PAGE - (address & (PAGE - 1)))
            try:
                out += self.memory.read(self._translate(mode, address, chunk), chunk)
            except (PageFault, GuestMemoryError):
                break
            address = (address + chunk) & 0xFFFFFFFFFFFFFFFF
            length -= chunk
        if not out and length:
            raise MemoryFault()
        return bytes(out)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        mode = self._paging(thread)
        pieces = []
        offset = 0
        try:
            while offset < len(data):
                linear = (address + offset) & 0xFFFFFFFFFFFFFFFF
                chunk = min(len(data) - offset, PAGE - (linear & (PAGE - 1)))
                physical = self._translate(mode, linear, chunk)
                pieces.append((physical, data[offset:offset + chunk]))
                offset += chunk
        except (PageFault, GuestMemoryError):
            raise MemoryFault() from None
        for physical, piece in pieces:
            self.memory.write(physical, piece)

    def add_point(self, kind: str, address: int, length: int) -> bool:
        support = self.support
        if kind in _WATCH_KINDS and _WATCH_KINDS[kind] not in support.watch_kinds:
            return False
        point = (kind, address, length)
        if point in self._points:
            return True
        uses_slot = not (kind == "software" and support.int3)
        if not uses_slot:
            try:  # int3 goes into guest code: the address must be mapped now, as with QEMU on KVM
                self._translate(self._paging(1), address)
            except (PageFault, GuestMemoryError):
                raise MemoryFault() from None
        if uses_slot and support.slots is not None:
            used = sum(1 for k, _, _ in self._points if not (k == "software" and support.int3))
            if used >= support.slots:
                raise Refused(f"all {support.slots} debug registers are in use")
            if kind in _WATCH_KINDS and (length not in (1, 2, 4, 8) or address % length):
                raise Refused(f"a debug register watches 1, 2, 4 or 8 aligned bytes, not {length} at {address:#x}")
        self._points.append(point)
        return True

    def remove_point(self, kind: str, address: int, length: int) -> None:
        if (kind, address, length) in self._points:
            self._points.remove((kind, address, length))
