"""A software-CPU vCPU: the same `run()` contract as a KVM vCPU, on a shared Unicorn engine.

`run()` returns only what the exit loop must act on: `Hlt` (halted with no
interrupt controller to wake it), `Shutdown` (triple fault),
`EmulationFailure`, `Interrupted` (kicked). Port I/O and MMIO never leave
the engine: its hooks hand them to the buses (vmm/tcg/io_dispatch.py), so
`IoIn`/`MmioRead` never need `complete_read`.

Guest code runs in slices: `emu_start` until HLT, an error, or the stop hook
(vmm/tcg/stop_hook.py) fires because another thread asked for it (a kick,
a pending interrupt, the end of the vCPU's time slice). Between slices the
vCPU takes pending interrupts and lets other vCPUs have the CPU
(vmm/tcg/scheduler.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmm.accel import MachineIo, Vcpu
from vmm.cpu_state import CpuState
from vmm.errors import GuestMemoryError
from vmm.exits import SUBERROR_EMULATION, EmulationFailure, Exit, Hlt, Interrupted, Shutdown
from vmm.guest_debug import GuestDebug
from vmm.memory import GuestMemory
from vmm.paging import PageFault, PagingMode, read_linear
from vmm.tcg.cpu_setup import load_cpu_state, read_registers
from vmm.tcg.debug import TcgDebugHooks, read_debug_registers, write_debug_registers
from vmm.tcg.delivery import (
    VECTORS_WITH_ERROR_CODE,
    Event,
    InterruptDelivery,
    TripleFault,
    UnsupportedDelivery,
)
from vmm.tcg.device_writes import TranslationInvalidator
from vmm.tcg.engine import Engine, UcError, x86
from vmm.tcg.qemu_env import (
    HF2_NMI_MASK,
    HF_INHIBIT_IRQ,
    OFF_EFER,
    OFF_EIP,
    OFF_HFLAGS2,
    R_CS,
    ContextBuffer,
)
from vmm.tcg.scheduler import SLICE_NS, CpuScheduler
from vmm.tcg.syscall import (
    InstructionFault,
    emulate_syscall,
    emulate_sysenter,
    instruction_length,
)
from vmm.tcg.ticker import Ticker

if TYPE_CHECKING:
    from devices.interrupts import InterruptRouter
    from vmm.tcg.io_dispatch import IoHooks

log = logging.getLogger(__name__)

NMI_VECTOR = 2
MIN_SLICE_NS = 50_000
# While an NMI waits for the previous one's IRET: the blocks looked at one by one,
# then at most 2**20 blocks ahead.
NMI_EXACT_LOOKS = 10_000
NMI_LOOK_AHEAD_MAX_SHIFT = 20


@dataclass
class SharedCpu:
    """What all vCPUs of one software-CPU VM share; the VM (vmm/tcg/vm.py) builds it."""

    engine: Engine
    scheduler: CpuScheduler
    delivery: InterruptDelivery
    invalidator: TranslationInvalidator  # drops code that devices overwrite
    ticker: Ticker  # ends a slice in time
    router: InterruptRouter | None  # the emulated interrupt controllers, if the machine has them
    memory: GuestMemory
    io: MachineIo
    pristine: ContextBuffer  # the reset state every new vCPU starts from
    debug_hooks: TcgDebugHooks  # the gdb stub's breakpoints, watchpoints and single-step
    io_hooks: IoHooks  # port I/O and MMIO straight to the buses


class TcgVcpu(Vcpu):
    def __init__(self, shared: SharedCpu, index: int) -> None:
        self.shared = shared
        self.index = index
        self.engine = shared.engine
        self.scheduler = shared.scheduler
        self.io_counts: Counter[str] = Counter()  # accesses vmm/tcg/io_dispatch.py dispatched
        # This vCPU's architectural state while another vCPU has the engine.
        self.context = self.engine.new_context()
        self.context.copy_from(shared.pristine)
        self.turn = self.scheduler.condition()  # on the scheduler's lock
        self.kick_pending = False
        self.pause_pending = False  # run() returns Interrupted between two slices
        self.halted = False
        self._pending_exit: Exit | None = None
        self.router = shared.router
        # With emulated interrupt controllers only the BSP starts running; the
        # others wait for INIT/SIPI from it, as KVM's APs do.
        self.started = index == 0 or self.router is None
        self._sipi_vector: int | None = None
        self._woken = False  # something became pending for this vCPU (under the scheduler lock)
        self._interrupts_enabled = False  # RFLAGS.IF when it halted
        self._nmi_blocked_looks = 0  # times a pending NMI found the last one's handler still running
        self._withdrawn: int | None = None  # acknowledged, handed to the engine, not delivered
        self._in_guest = False  # inside emu_start
        self._slice_thread = 0  # the thread running this vCPU's slices
        # The gdb stub's state for this vCPU (vmm/tcg/debug.py).
        self.debug_step = False
        self.step_done = False
        self.breakpoint_to_skip: int | None = None

    # -- the Vcpu interface ---------------------------------------------------------

    def set_state(self, state: CpuState) -> None:
        with self._owning_cpu():
            load_cpu_state(self.engine, state)
        self.halted = False
        self.started = True

    def run(self) -> Exit:
        while True:
            with self.scheduler.lock:
                if self.kick_pending or self.pause_pending:
                    self.kick_pending = self.pause_pending = False
                    return Interrupted()
            if self.router is None and self.halted:
                self.halted = False  # KVM semantics: running again continues after the HLT
                return Hlt()
            if not self.started or self.halted:
                self._wait_for_work()
                continue
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

    def pause(self) -> None:
        # Not a kick: after a kick the port accesses the rest of the translated
        # block makes are dropped (vmm/tcg/vm.py), which only a stop may do. The
        # slice ends at the next block boundary, as for a timer.
        with self.scheduler.lock:
            self.pause_pending = True
            running = self.scheduler.owner is self
        if running:
            self.engine.stop_hook.request()

    def wake(self, *, at_once: bool = False) -> None:
        """Something became pending for this vCPU (any thread): end its sleep or its slice.

        A wake caused by this vCPU's own thread while it prepares a slice (its
        timer found due while it looks for interrupts) needs no stop: the slice
        has not started and the interrupt is looked at before it does.

        A wake caused by its own guest code, in a device access (a UART raising
        its line, an EOI that unblocks the next interrupt, a disk completing a
        request inside its queue notification), is handed to the engine at once
        when the guest can take it (`_inject_from_access`), without ending the
        slice. Otherwise, mostly with interrupts disabled (drivers touch their
        devices under a lock), the slice would stop now only to find that and
        stop again where the guest enables them: instead it runs on to that point
        (the stop hook watches for it). An NMI, and INIT and SIPI (`at_once`),
        stop it at the next block.
        """
        own_thread = threading.get_ident() == self._slice_thread
        with self.scheduler.lock:
            self._woken = True
            if not own_thread:
                self.turn.notify()  # only this vCPU's thread sleeps until woken
            running = self.scheduler.owner is self
        if not running or (own_thread and not self._in_guest):
            return
        if own_thread and not at_once:
            if self._inject_from_access():
                return
            if not self.router.has_nmi(self.index):
                self.engine.stop_hook.stop_at_interrupt_window()
                return
        self.engine.stop_hook.request()

    def _inject_from_access(self) -> bool:
        """In this vCPU's own device access: hand the interrupt that just became pending to the
        running engine, which delivers it before the next translated block (as QEMU's TCG
        takes an interrupt its devices raise), if the guest can take it now. True if handed
        over.

        Only with RFLAGS.IF set, no NMI waiting (it comes first) and nothing in service:
        the vector is acknowledged now and delivered a few instructions later, and an EOI
        in between (from a handler still running) would end it instead of the handler's
        own vector. An interrupt shadow needs no look: the engine's own delivery waits for
        it. Only when nothing was handed over yet, in this slice or kept from the last one.
        """
        injector, engine = self.engine.injector, self.engine
        if (injector is None or not injector.can_inject_running or injector.pending
                or self._withdrawn is not None or self.debug_step
                or not engine.interrupts_enabled()):
            return False
        vector = self.router.acknowledge_if_idle(self.index)
        if vector is None:
            return False
        injector.inject_running(vector)
        return True

    def receive_init(self) -> None:
        self.started = False
        self.halted = False
        self._sipi_vector = None
        self.wake(at_once=True)

    def receive_sipi(self, vector: int) -> None:
        self._sipi_vector = vector
        self.wake(at_once=True)

    def dispatched_io_counts(self) -> Mapping[str, int]:
        return self.io_counts

    def registers(self) -> dict[str, int]:
        with self._owning_cpu():
            return read_registers(self.engine)

    def set_guest_debug(self, debug: GuestDebug) -> None:
        self.shared.debug_hooks.apply(self, debug)

    def debug_registers(self) -> dict[str, int | None]:
        with self._owning_cpu():
            return read_debug_registers(self.engine)

    def write_debug_registers(self, values: dict[str, int]) -> None:
        with self._owning_cpu():
            write_debug_registers(self.engine, values)

    def code_at_rip(self) -> tuple[int, bytes]:
        with self._owning_cpu():
            rip = self.engine.reg(x86.UC_X86_REG_RIP)
            if not self.started or self.halted:  # runs no code: an AP waiting for SIPI, or HLT
                return self._linear_rip(rip), b""
            return self._linear_rip(rip), self._instruction_bytes(rip)

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

    def _wait_for_work(self) -> None:
        """Sleep (halted, or waiting for SIPI) until there is something to do, or a kick."""
        with self.scheduler.lock:
            self._woken = False
        if self._sipi_vector is not None:
            vector, self._sipi_vector = self._sipi_vector, None
            self.set_state(CpuState.real_mode(vector << 8, 0))
            return
        if self.started and self._interrupt_for_halted_cpu():
            self.halted = False
            return
        deadline = self.router.next_deadline() if self.router is not None else None
        with self.scheduler.lock:
            if self.kick_pending or self._woken:
                return
            if deadline is None:
                self.turn.wait()
            else:
                delay = deadline - time.monotonic_ns()
                if delay > 0:
                    self.turn.wait(delay / 1e9)

    def _interrupt_for_halted_cpu(self) -> bool:
        router = self.router
        if router is None:
            return False
        if router.has_nmi(self.index):
            return True
        # A kept vector counts: one handed to the engine in STI's shadow comes back
        # when the shadowed instruction is the HLT (`sti; hlt`), already acknowledged.
        return self._interrupts_enabled and (self._withdrawn is not None or router.has_interrupt(self.index))

    def _run_slice(self) -> Exit | None:
        engine = self.engine
        engine.stop_hook.clear()
        if self.kick_pending:  # checked after clearing, so a kick is never lost
            return None
        self._slice_thread = threading.get_ident()
        self.shared.invalidator.start_owning()
        try:
            if self.router is not None and not self.debug_step:  # a step never lands in a handler
                self._take_interrupt()
            # Armed after clearing the stop request, so that no alarm is lost.
            self._arm_ticker()
            if self._pending_exit is None:
                self._in_guest = True
                engine.start(engine.reg(x86.UC_X86_REG_RIP))
        except UcError as err:
            return self._emulation_failure(f"Unicorn stopped: {err}")
        finally:
            self._in_guest = False
            if engine.injector is not None:
                self._take_back_undelivered()
            self.shared.invalidator.stop_owning()
            self.shared.ticker.disarm()
            self.shared.io_hooks.slice_ended(self.io_counts)
        if self._pending_exit is not None:
            exit, self._pending_exit = self._pending_exit, None
            return exit
        if not engine.stop_hook.requested:
            self.halted = True  # emu_start returns by itself only at HLT
            self._interrupts_enabled = engine.interrupts_enabled()
        return None

    def _take_back_undelivered(self) -> None:
        """An interrupt handed to the engine but not delivered (the slice stopped first) must not
        go to whichever vCPU runs on the engine next: this vCPU keeps it for its next slice.

        One kept from an earlier slice, which the guest could not take yet (IF clear, say after
        an NMI's delivery), stays kept: it is acknowledged, and dropping it would leave its
        in-service bit set for good, blocking it and every lower-priority vector. The two never
        meet: an interrupt is handed to the engine only when none is kept.
        """
        withdrawn = self.engine.injector.withdraw()
        if withdrawn is not None:
            self._withdrawn = withdrawn

    def _take_interrupt(self) -> None:
        """Deliver an NMI or one external interrupt, if the guest can take it now; else have the
        slice stop where it can (vmm/tcg/stop_hook.py watches for the window)."""
        router, index, engine = self.router, self.index, self.engine
        rip = engine.reg(x86.UC_X86_REG_RIP)
        if router.has_nmi(index):
            # An NMI blocks further NMIs until the next IRET, which clears
            # QEMU's HF2_NMI_MASK; setting it is ours, as delivery is.
            env = engine.context.save()
            if env.u32(OFF_HFLAGS2) & HF2_NMI_MASK:
                # The handler's IRET ends a block, but which one is not known: look at
                # every block start for the length of a short handler (then the NMI
                # comes right after its IRET, which Linux and kvm-unit-tests expect),
                # then 2, 4, 8, ... blocks ahead, so that a long-running handler does
                # not make a trip through Python for every one of its loops.
                looks = self._nmi_blocked_looks - NMI_EXACT_LOOKS
                engine.stop_hook.watch_blocks_ahead(1 << min(max(looks, 0), NMI_LOOK_AHEAD_MAX_SHIFT))
                self._nmi_blocked_looks += 1
            elif router.take_nmi(index):
                self._nmi_blocked_looks = 0
                self.deliver(Event(NMI_VECTOR, external=True), rip)
                env = engine.context.save()
                env.set_u32(OFF_HFLAGS2, env.u32(OFF_HFLAGS2) | HF2_NMI_MASK)
                engine.context.restore()
                rip = engine.reg(x86.UC_X86_REG_RIP)
        if self._withdrawn is None and not router.has_interrupt(index):
            return
        # (A watch for a blocked NMI is kept: it stops within its look-ahead, and the slice
        # still ends at the next timer deadline.)
        if not engine.interrupts_enabled():
            if not engine.stop_hook.watching:
                engine.stop_hook.watch_interrupt_flag(skip_blocks=0)
            return
        # After STI or MOV SS the next instruction runs first, in a block of its own. The
        # engine's own delivery waits for it (QEMU checks the shadow before it delivers), so an
        # interrupt handed to it needs no second stop. But it is acknowledged when handed over:
        # while another one is in service, the shadowed instruction could be that handler's
        # EOI, which would end the wrong vector; then, and for Python's delivery, stop again.
        if ((engine.injector is None or router.in_service(index))
                and engine.context.save().hflags & HF_INHIBIT_IRQ):
            if not engine.stop_hook.watching:
                engine.stop_hook.watch_interrupt_flag(skip_blocks=1)
            return
        vector = self._withdrawn if self._withdrawn is not None else router.acknowledge(index)
        self._withdrawn = None
        if vector is None:
            return
        if engine.injector is None:
            self.deliver(Event(vector, external=True), rip)
        else:
            engine.injector.inject(vector)  # delivered by the engine before the slice's first instruction

    def _arm_ticker(self) -> None:
        """When this slice must end at the latest: a timer, a waiting vCPU."""
        now = time.monotonic_ns()
        candidates = []
        if self.router is not None:
            candidates.append(self.router.next_deadline())
        if self.scheduler.contended:
            candidates.append(self.scheduler.owner_since + SLICE_NS)
        deadlines = [d for d in candidates if d is not None]
        if deadlines:
            self.shared.ticker.arm(max(min(deadlines), now + MIN_SLICE_NS))

    def stop_with(self, exit: Exit) -> None:
        """From a hook: end the slice and make run() return `exit`."""
        self._pending_exit = exit
        self.engine.stop_hook.request()
        self.engine.uc.emu_stop()

    def _emulation_failure(self, detail: str) -> EmulationFailure:
        rip = self.engine.reg(x86.UC_X86_REG_RIP)
        return EmulationFailure(SUBERROR_EMULATION, rip=self._linear_rip(rip),
                                instruction=self._instruction_bytes(rip), detail=detail)

    def _linear_rip(self, rip: int) -> int:
        env = self.engine.context.save()
        return (env.segment(R_CS)[1] + rip) & 0xFFFFFFFFFFFFFFFF

    def _instruction_bytes(self, rip: int) -> bytes:
        env = self.engine.context.save()
        mode = PagingMode(env.cr(0), env.cr(3), env.cr(4), env.u64(OFF_EFER))
        try:
            return read_linear(self.shared.memory, mode, env.segment(R_CS)[1] + rip, 15)
        except (PageFault, GuestMemoryError):
            return b""

    # -- events from the engine's hooks (called on this vCPU's thread) ---------------

    def on_exception(self, vector: int) -> None:
        env = self.engine.context.save()
        software = env.exception_is_int
        error_code = env.error_code if vector in VECTORS_WITH_ERROR_CODE else None
        # Unicorn already moved RIP past `int n`; for faults it points at the instruction.
        rip = self.engine.reg(x86.UC_X86_REG_RIP)
        start = self._software_interrupt_start(rip, vector) if software else None
        self.deliver(Event(vector, error_code, software=software, instruction_rip=start), rip)

    def _software_interrupt_start(self, next_rip: int, vector: int) -> int:
        """Where the `int n` (CD ib), `int3` (CC) or `into` (CE) that ends at `next_rip` starts."""
        before = self._instruction_bytes(next_rip - 2)[:2]
        return next_rip - 2 if before == bytes((0xCD, vector)) else next_rip - 1

    def on_invalid_instruction(self) -> bool:
        self.deliver(Event(6), self.engine.reg(x86.UC_X86_REG_RIP))
        return True

    def on_syscall(self) -> None:
        self._system_call(emulate_syscall)

    def on_sysenter(self) -> None:
        self._system_call(emulate_sysenter)

    def _system_call(self, emulate) -> None:
        try:
            emulate(self.engine, self._fetch_code)
        except InstructionFault as fault:
            rip = self.engine.reg(x86.UC_X86_REG_RIP)  # the SYSCALL/SYSENTER instruction itself
            self.deliver(Event(fault.vector, fault.error_code), rip)
            # Unicorn adds the instruction's length to RIP when the hook returns.
            env = self.engine.context.save()
            env.set_u64(OFF_EIP, env.u64(OFF_EIP) - instruction_length(self._fetch_code(rip, 15)))
            self.engine.context.restore()

    def _fetch_code(self, rip: int, length: int) -> bytes:
        return self._instruction_bytes(rip)[:length] or b"\x0f\x05"

    def deliver(self, event: Event, return_rip: int) -> None:
        try:
            self.shared.delivery.deliver(event, return_rip)
        except TripleFault:
            self.stop_with(Shutdown())
        except UnsupportedDelivery as err:
            self.stop_with(self._emulation_failure(str(err)))

