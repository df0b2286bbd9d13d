"""A software-CPU vCPU: the same `run()` contract as a KVM vCPU, on a shared Unicorn engine.

`run()` returns only what the exit loop must act on: `Hlt` (halted with no
interrupt controller to wake it), `Shutdown` (triple fault),
`EmulationFailure`, `Interrupted` (kicked). Port I/O and MMIO never leave
the engine: its hooks hand them to the buses through `self.io` (see
vmm/tcg/io_dispatch.py), so `IoIn`/`MmioRead` never need `complete_read`.

Guest code runs in slices: `emu_start` until HLT, an error, or the stop hook
(vmm/tcg/stop_hook.py) fires because another thread asked for it (a kick,
a pending interrupt, the end of the vCPU's time slice). Between slices the
vCPU takes pending interrupts and lets other vCPUs have the CPU
(vmm/tcg/scheduler.py).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING

from vmm.accel import Vcpu
from vmm.cpu_state import CpuState
from vmm.errors import GuestMemoryError
from vmm.exits import EmulationFailure, Exit, Hlt, Interrupted, Shutdown
from vmm.tcg.cpu_setup import load_cpu_state, read_registers
from vmm.tcg.delivery import Event, TripleFault, UnsupportedDelivery
from vmm.tcg.engine import UcError, x86
from vmm.tcg.io_dispatch import IoDispatcher
from vmm.tcg.paging import PageFault, PagingMode, read_linear
from vmm.tcg.qemu_env import OFF_EFER, OFF_EIP, R_CS, ContextBuffer
from vmm.tcg.syscall import SyscallNotEnabled, emulate_syscall, instruction_length

if TYPE_CHECKING:
    from vmm.tcg.vm import TcgVirtualMachine

log = logging.getLogger(__name__)

KVM_INTERNAL_ERROR_EMULATION = 1  # the suberror KVM uses for "could not emulate"


class TcgVcpu(Vcpu):
    def __init__(self, vm: TcgVirtualMachine, index: int) -> None:
        self.vm = vm
        self.index = index
        self.engine = vm.engine
        self.scheduler = vm.scheduler
        self.io = IoDispatcher(vm.io)
        # This vCPU's architectural state while another vCPU has the engine.
        self.context = ContextBuffer(vm.uclib, self.engine.handle)
        vm.pristine_context_into(self.context)
        self.turn = self.scheduler.condition()  # on the scheduler's lock
        self.kick_pending = False
        self.halted = False
        self._pending_exit: Exit | None = None

    # -- the Vcpu interface ---------------------------------------------------------

    def set_state(self, state: CpuState) -> None:
        with self._owning_cpu():
            load_cpu_state(self.engine, state)
        self.halted = False

    def run(self) -> Exit:
        while True:
            with self.scheduler.lock:
                if self.kick_pending:
                    self.kick_pending = False
                    return Interrupted()
            if self.halted:
                self.halted = False  # KVM semantics: running again continues after the HLT
                return Hlt()
            if not self.scheduler.acquire(self, self.turn, lambda: self.kick_pending):
                continue
            try:
                self.scheduler.make_live(self.context)
                exit = self._run_slice()
            finally:
                self.scheduler.release(self)
            if exit is not None:
                return exit

    def complete_read(self, data: bytes) -> None:
        raise RuntimeError("the software CPU answers port and MMIO reads inside its hooks")

    def kick(self) -> None:
        with self.scheduler.lock:
            self.kick_pending = True
            self.turn.notify()
            running = self.scheduler.owner is self
        if running:
            self.engine.stop_hook.request()

    def registers(self) -> dict[str, int]:
        with self._owning_cpu():
            return read_registers(self.engine)

    def close(self) -> None:
        self.scheduler.forget(self.context)
        self.context.free()

    # -- running ----------------------------------------------------------------------

    @contextmanager
    def _owning_cpu(self):
        """Own the CPU with this vCPU's state live, outside run() (set_state, registers)."""
        self.scheduler.acquire(self, self.turn, lambda: False)
        try:
            self.scheduler.make_live(self.context)
            yield
        finally:
            self.scheduler.release(self)

    def _run_slice(self) -> Exit | None:
        engine = self.engine
        engine.stop_hook.clear()
        if self.kick_pending:  # checked after clearing, so a kick is never lost
            return None
        self.vm.running = self
        try:
            engine.start(engine.reg(x86.UC_X86_REG_RIP))
        except UcError as err:
            return self._emulation_failure(f"Unicorn stopped: {err}")
        finally:
            self.vm.running = None
        if self._pending_exit is not None:
            exit, self._pending_exit = self._pending_exit, None
            return exit
        if not engine.stop_hook.requested:
            self.halted = True  # emu_start returns by itself only at HLT
        return None

    def stop_with(self, exit: Exit) -> None:
        """From a hook: end the slice and make run() return `exit`."""
        self._pending_exit = exit
        self.engine.stop_hook.request()
        self.engine.uc.emu_stop()

    def _emulation_failure(self, detail: str) -> EmulationFailure:
        rip = self.engine.reg(x86.UC_X86_REG_RIP)
        return EmulationFailure(KVM_INTERNAL_ERROR_EMULATION, rip=self._linear_rip(rip),
                                instruction=self._instruction_bytes(rip), detail=detail)

    def _linear_rip(self, rip: int) -> int:
        env = self.engine.context.save()
        return (env.segment(R_CS)[1] + rip) & 0xFFFFFFFFFFFFFFFF

    def _instruction_bytes(self, rip: int) -> bytes:
        env = self.engine.context.save()
        mode = PagingMode(env.cr(0), env.cr(3), env.cr(4), env.u64(OFF_EFER))
        try:
            return read_linear(self.vm.memory, mode, env.segment(R_CS)[1] + rip, 15)
        except (PageFault, GuestMemoryError):
            return b""

    # -- events from the engine's hooks (called on this vCPU's thread) ---------------

    def on_exception(self, vector: int) -> None:
        env = self.engine.context.save()
        software = env.exception_is_int
        error_code = env.error_code if vector in _ERROR_CODE_VECTORS else None
        # Unicorn already moved RIP past `int n`; for faults it points at the instruction.
        self.deliver(Event(vector, error_code, software=software), self.engine.reg(x86.UC_X86_REG_RIP))

    def on_invalid_instruction(self) -> bool:
        self.deliver(Event(6), self.engine.reg(x86.UC_X86_REG_RIP))
        return True

    def on_syscall(self) -> None:
        try:
            emulate_syscall(self.engine, self._fetch_code)
        except SyscallNotEnabled:
            rip = self.engine.reg(x86.UC_X86_REG_RIP)  # the SYSCALL instruction itself
            self.deliver(Event(6), rip)
            # Unicorn adds the instruction's length to RIP when the hook returns.
            env = self.engine.context.save()
            env.set_u64(OFF_EIP, env.u64(OFF_EIP) - instruction_length(self._fetch_code(rip, 15)))
            self.engine.context.restore()

    def _fetch_code(self, rip: int, length: int) -> bytes:
        return self._instruction_bytes(rip)[:length] or b"\x0f\x05"

    def deliver(self, event: Event, return_rip: int) -> None:
        try:
            self.vm.delivery.deliver(event, return_rip)
        except TripleFault:
            self.stop_with(Shutdown())
        except UnsupportedDelivery as err:
            self.stop_with(self._emulation_failure(str(err)))


_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})
