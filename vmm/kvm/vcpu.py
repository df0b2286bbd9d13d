"""`KvmVcpu`: one vCPU on /dev/kvm, and the top of every KVM exit.

`KvmVcpu.run` enters KVM_RUN and turns what the kernel wrote into `kvm_run`
into one of the exit values in vmm/exits.py, which the exit loop
(vmm/vcpu_thread.py) hands to the buses (vmm/bus.py): those three files are
the whole path from KVM_RUN to `device.read` / `device.write`.

Where the compiled exit loop was built (vmm/kvm/exit_loop.py), `run` enters
the guest through it instead, and port and MMIO exits go from C straight to
the same buses; `run` then returns only the other exits.
"""

from __future__ import annotations

import logging
import signal
import struct
import threading

from vmm.accel import MachineIo, Vcpu
from vmm.cpu_state import GPR_NAMES, CpuState, Segment
from vmm.errors import GuestMemoryError, PyvmmError
from vmm.exits import (
    EmulationFailure,
    EntryFailure,
    Exit,
    Hlt,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    UnknownExit,
)
from vmm.guest_debug import GuestDebug
from vmm.kvm import debug as guest_debug
from vmm.kvm import quirks
from vmm.kvm import uapi as k
from vmm.kvm.exit_loop import CompiledExitLoop
from vmm.kvm.fd import VcpuFd
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

# A kick is this signal sent to the vCPU's thread: its only job is to make a
# blocked KVM_RUN return EINTR. The handler must exist (an ignored signal
# would not interrupt the ioctl) and does nothing.
KICK_SIGNAL = signal.SIGUSR1

# kvm_run read as bytes on the mapped page (cffi attribute reads cost more):
# exit_reason at offset 8 and the union at offset 32, whose io member
# (direction, size, port, count, data_offset) comes with the reason in the
# same unpack, since port I/O is the commonest exit (for any other exit
# those five values are unused); the mmio member (phys_addr, len, is_write;
# the data bytes in between, at MMIO_DATA) takes a second one.
_EXIT_HEAD = struct.Struct("<8xI20xBBHIQ")
_EXIT_MMIO = struct.Struct("<Q8xIB")
_UNION = 32
_MMIO_DATA = _UNION + 8
_IO, _IO_OUT, _MMIO = k.KVM_EXIT_IO, k.KVM_EXIT_IO_OUT, k.KVM_EXIT_MMIO

_SYSTEM_EVENTS = {
    k.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    k.KVM_SYSTEM_EVENT_RESET: "reset",
    k.KVM_SYSTEM_EVENT_CRASH: "crash",
}


def install_kick_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise PyvmmError("the KVM accelerator must be created on the main thread (it installs a signal handler)")


def _emulation_advice() -> str:
    """What to do about an instruction KVM could not emulate: a host quirk's fault, or the guest's."""
    if quirks.is_kvm_pvm():
        return ("this host's KVM cannot run this guest; boot it with --accel tcg (the software CPU) "
                "or on a host with hardware virtualisation")
    return ("the guest ran an instruction KVM does not emulate (often an access to an address "
            "no device or RAM answers); --accel tcg runs the same machine on the software CPU")


class KvmVcpu(Vcpu):
    def __init__(self, index: int, fd: VcpuFd, memory: GuestMemory, step_blocks_irq: bool = False,
                 compiled_loop_io: MachineIo | None = None) -> None:
        """`compiled_loop_io`: the buses the compiled exit loop hands I/O to (vmm/kvm/exit_loop.py);
        None: the Python loop, where `run` returns every exit."""
        self.index = index
        self.fd = fd
        self.memory = memory
        self._run = fd.kvm_run
        self._page = fd.run_page
        # Both return False when interrupted; the compiled loop returns only exits that are not I/O.
        self._compiled = (CompiledExitLoop(fd.fd, fd.kvm_run_address, compiled_loop_io)
                          if compiled_loop_io is not None else None)
        self._enter = self._compiled.run if self._compiled is not None else fd.run
        self._thread_ident: int | None = None
        self._thread_lock = threading.Lock()  # a kick never signals a thread that has ended
        self._pending_read: tuple[int, int] | None = None  # (offset into kvm_run page, length)
        self._debug = GuestDebug()  # what the gdb stub asked for (vmm/kvm/debug.py)
        self._step_blocks_irq = step_blocks_irq

    # -- state ---------------------------------------------------------------

    def set_state(self, state: CpuState) -> None:
        sregs = self.fd.get_sregs()
        for name, segment in state.segments.items():
            _store_segment(getattr(sregs, name), segment)
        sregs.gdt.base, sregs.gdt.limit = state.gdt
        sregs.idt.base, sregs.idt.limit = state.idt
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
        self.fd.set_sregs(sregs)
        regs = k.ffi.new("struct kvm_regs *")
        for name in (*GPR_NAMES, "rip", "rflags"):
            setattr(regs, name, state.reg(name))
        self.fd.set_regs(regs)

    def registers(self) -> dict[str, int]:
        regs = self.fd.get_regs()
        sregs = self.fd.get_sregs()
        values = {name: getattr(regs, name) for name in (*GPR_NAMES, "rip", "rflags")}
        values.update(cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer,
                      cs=sregs.cs.selector, cs_base=sregs.cs.base)
        return values

    def instruction_bytes(self, length: int = 15) -> tuple[int | None, bytes]:
        """RIP and the bytes at it, read through the guest's own translation; b"" if unreadable."""
        try:
            regs = self.registers()
        except PyvmmError:
            return None, b""
        return regs["rip"], self._code_at(regs["cs_base"] + regs["rip"], length)

    def code_at_rip(self) -> tuple[int, bytes]:
        regs = self.registers()
        linear = regs["cs_base"] + regs["rip"]
        return linear, self._code_at(linear, 15)

    def _code_at(self, linear: int, length: int) -> bytes:
        try:
            physical = self.fd.translate(linear)
        except PyvmmError:
            physical = None
        if physical is None:
            return b""
        # Stop at the page end: the next page may map elsewhere.
        length = min(length, 4096 - (physical & 0xFFF))
        try:
            return self.memory.read(physical, length)
        except GuestMemoryError:
            return b""

    # -- running -------------------------------------------------------------

    def run(self) -> Exit:
        if self._thread_ident is None:
            with self._thread_lock:
                self._thread_ident = threading.get_ident()
        if not self._enter():
            self._run.immediate_exit = 0
            return Interrupted()
        page = self._page
        reason, direction, size, port, count, offset = _EXIT_HEAD.unpack_from(page)
        if reason == _IO:
            if direction == _IO_OUT:
                return IoOut(port, size, count, page[offset : offset + size * count].tobytes())
            self._pending_read = (offset, size * count)
            return IoIn(port, size, count)
        if reason == _MMIO:
            address, length, is_write = _EXIT_MMIO.unpack_from(page, _UNION)
            length = min(length, 8)  # the kernel never says more; the data area holds 8
            if is_write:
                return MmioWrite(address, page[_MMIO_DATA : _MMIO_DATA + length].tobytes())
            self._pending_read = (_MMIO_DATA, length)
            return MmioRead(address, length)
        run = self._run
        if reason == k.KVM_EXIT_HLT:
            return Hlt()
        if reason == k.KVM_EXIT_INTR:
            return Interrupted()
        if reason == k.KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == k.KVM_EXIT_SYSTEM_EVENT:
            return SystemEvent(_SYSTEM_EVENTS.get(run.system_event.type, f"type {run.system_event.type}"))
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            return EntryFailure(run.fail_entry.hardware_entry_failure_reason, self.registers()["rip"])
        if reason == k.KVM_EXIT_DEBUG:
            return self._debug_exit()
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            rip, instruction = self.instruction_bytes()
            return EmulationFailure(run.internal.suberror, rip, instruction, detail=_emulation_advice())
        return UnknownExit(reason)

    # -- the gdb stub ---------------------------------------------------------

    def set_guest_debug(self, debug: GuestDebug) -> None:
        if debug != self._debug:
            self.fd.set_guest_debug(*guest_debug.guest_debug_request(debug, self._step_blocks_irq))
            self._debug = debug

    def _debug_exit(self) -> Exit:
        trap = guest_debug.trap_from_exit(self._run, self._debug)
        if trap is not None:
            return trap
        # The guest's own #BP or #DB while debugging is on: hand it back.
        log.debug("vCPU %d: the guest's own exception %d at %#x, handed back", self.index,
                  self._run.debug.exception, self._run.debug.pc)
        control, debugreg = guest_debug.guest_debug_request(self._debug, self._step_blocks_irq)
        self.fd.set_guest_debug(control | guest_debug.reinjection(self._run), debugreg)
        return Interrupted()

    def debug_registers(self) -> dict[str, int | None]:
        return guest_debug.read_debug_registers(self.fd)

    def write_debug_registers(self, values: dict[str, int]) -> None:
        guest_debug.write_debug_registers(self.fd, values)

    def dispatched_io_counts(self) -> dict[str, int]:
        return self._compiled.io_counts() if self._compiled is not None else {}

    def complete_read(self, data: bytes) -> None:
        offset, length = self._pending_read
        self._page[offset : offset + length] = data[:length]
        self._pending_read = None

    def kick(self) -> None:
        self._run.immediate_exit = 1
        with self._thread_lock:
            # Signalling a thread that has ended is undefined (its id may be reused).
            if self._thread_ident is not None:
                signal.pthread_kill(self._thread_ident, KICK_SIGNAL)

    def thread_done(self) -> None:
        with self._thread_lock:
            self._thread_ident = None

    def close(self) -> None:
        self._run = None
        self._page = None
        self.fd.close()


def _store_segment(target, segment: Segment) -> None:
    target.base = segment.base
    target.limit = segment.limit
    target.selector = segment.selector
    target.type = segment.type
    target.present = int(segment.present)
    target.dpl = segment.dpl
    target.db = int(segment.db)
    target.s = int(segment.s)
    target.l = int(segment.l)
    target.g = int(segment.g)
    target.avl = int(segment.avl)
    target.unusable = int(segment.unusable)
