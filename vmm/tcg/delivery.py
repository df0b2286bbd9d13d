"""Delivering exceptions and interrupts to the guest, as the CPU would (Intel SDM vol. 3, ch. 6).

Unicorn never vectors through the guest's IDT: every exception and `int n`
ends in a hook, and external interrupts cannot be injected at all. Page
faults and external interrupts, the frequent events, are handed to QEMU's
own delivery code inside the engine (vmm/tcg/native_exceptions.py,
vmm/tcg/native_interrupts.py) where the library is the known build; for
everything else (and all events elsewhere) the software CPU builds the
interrupt frame itself:

- real mode: the IVT, a FLAGS/CS/IP frame on SS:SP;
- protected mode: 16- and 32-bit interrupt and trap gates, the stack switch
  through the TSS on a privilege change, the error code;
- long mode: 64-bit gates, the TSS RSP0-2 and IST stacks, the 16-byte stack
  alignment, SS:RSP always pushed.

A fault while delivering (gate not present, a stack page missing, ...)
becomes the next event by the SDM's rules: two contributory faults, or a
page fault followed by a contributory or page fault, make a double fault;
a fault while delivering a double fault shuts the CPU down (`TripleFault`).
Task gates and virtual-8086 mode are not supported (Linux uses neither) and
raise `UnsupportedDelivery`.

After a delivery QEMU's "exception in flight" marker is cleared, as QEMU's
own delivery code does; otherwise the next #PF would be turned into a #DF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.cpu_state import (
    CR0_PE,
    EFER_LMA,
    RFLAGS_AC,
    RFLAGS_IF,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
)
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory
from vmm.paging import PageFault, PagingMode, read_linear, write_linear
from vmm.tcg import descriptors as desc
from vmm.tcg.engine import Engine, x86
from vmm.tcg.qemu_env import (
    OFF_EFER,
    OFF_EIP,
    OFF_GDT,
    OFF_IDT,
    OFF_LDT,
    OFF_REGS,
    OFF_TR,
    R_CS,
    R_SS,
    EnvView,
)

DE, NMI, DF = 0, 2, 8
TS, NP, SS, GP, PF = 10, 11, 12, 13, 14
AC = 17
CP = 21
VECTORS_WITH_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, AC, CP})
CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})

RSP_INDEX = 4  # RSP's slot in QEMU's register file

ERROR_CODE_EXT = 1  # the event came from outside the program (not `int n`)
ERROR_CODE_IDT = 2  # the selector index refers to the IDT


class TripleFault(Exception):
    """The CPU shut down: a fault while delivering a double fault."""


class UnsupportedDelivery(Exception):
    """An event pyvmm cannot deliver (task gate, virtual-8086 mode)."""


class DeliveryFault(Exception):
    """A fault raised while delivering another event."""

    def __init__(self, vector: int, error_code: int = 0, cr2: int | None = None) -> None:
        super().__init__(f"vector {vector} error code {error_code:#x}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


@dataclass
class Event:
    vector: int
    error_code: int | None = None  # pushed only in protected and long mode
    software: bool = False  # `int n`, `int3`, `into`: privilege checked against the gate's DPL
    external: bool = False  # from the interrupt controller
    # A software interrupt's own address: a fault while delivering it is a fault
    # of the instruction, whose handler returns to the instruction (SDM 6.5).
    instruction_rip: int | None = None

    @property
    def ext_bit(self) -> int:
        return 0 if self.software else ERROR_CODE_EXT


def escalates(first: int, second: int) -> bool:
    """Whether a fault while delivering `first` makes a double fault (SDM table 6-5)."""
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return True
    return first == PF and (second == PF or second in CONTRIBUTORY)


class InterruptDelivery:
    """Builds interrupt frames on the live engine state of the vCPU that is running."""

    def __init__(self, engine: Engine, memory: GuestMemory) -> None:
        self.engine = engine
        self.memory = memory
        self.delivered = 0

    def deliver(self, event: Event, return_rip: int) -> None:
        """Deliver `event` with `return_rip` as the saved instruction pointer.

        Raises TripleFault or UnsupportedDelivery; the guest state is only
        changed when delivery succeeds.
        """
        for _ in range(3):
            try:
                self._deliver_once(event, return_rip)
                self.delivered += 1
                return
            except DeliveryFault as fault:
                if event.vector == DF:
                    raise TripleFault() from None
                if fault.cr2 is not None:
                    self.engine.write_reg(x86.UC_X86_REG_CR2, fault.cr2)
                if event.instruction_rip is not None:
                    return_rip = event.instruction_rip
                if not event.software and not event.external and escalates(event.vector, fault.vector):
                    event = Event(DF, 0)
                else:
                    event = Event(fault.vector, fault.error_code)
        raise TripleFault()

    # -- one attempt -------------------------------------------------------------

    def _deliver_once(self, event: Event, return_rip: int) -> None:
        rflags = self.engine.reg(x86.UC_X86_REG_RFLAGS)
        env = self.engine.context.save()
        cr0 = env.cr(0)
        self.paging = PagingMode(cr0, env.cr(3), env.cr(4), env.u64(OFF_EFER))
        if rflags & RFLAGS_VM:
            raise UnsupportedDelivery("interrupt in virtual-8086 mode")
        if env.u64(OFF_EFER) & EFER_LMA:
            new_rflags = self._long_mode(env, event, return_rip, rflags)
        elif cr0 & CR0_PE:
            new_rflags = self._protected_mode(env, event, return_rip, rflags)
        else:
            new_rflags = self._real_mode(env, event, return_rip, rflags)
        env.clear_exception_in_flight()
        self.engine.context.restore()
        # Through the API: QEMU keeps the arithmetic flags in separate, lazily computed fields.
        self.engine.write_reg(x86.UC_X86_REG_RFLAGS, new_rflags)

    def _real_mode(self, env: EnvView, event: Event, return_rip: int, rflags: int) -> int:
        _, idt_base, idt_limit, _ = env.table(OFF_IDT)
        if 4 * event.vector + 3 > idt_limit:
            raise DeliveryFault(GP, 0)
        ip, cs = struct.unpack("<HH", self._read(idt_base + 4 * event.vector, 4))
        ss_base = env.segment(R_SS)[1]
        sp = env.u64(OFF_REGS + 8 * RSP_INDEX)
        old_cs = env.segment(R_CS)[0]
        frame = struct.pack("<HHH", return_rip & 0xFFFF, old_cs, rflags & 0xFFFF)
        new_sp = (sp - 6) & 0xFFFF
        self._write(ss_base + new_sp, frame)  # an SP below 6 wraps, as on the 8086
        env.set_u64(OFF_REGS + 8 * RSP_INDEX, (sp & ~0xFFFF) | new_sp)
        _, _, limit, flags = env.segment(R_CS)
        env.load_segment(R_CS, cs, cs << 4, limit, flags)
        env.set_u64(OFF_EIP, ip)
        return rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC)

    def _protected_mode(self, env: EnvView, event: Event, return_rip: int, rflags: int) -> int:
        gate = self._read_gate(env, event, size=8)
        if gate.type == desc.GATE_TASK:
            raise UnsupportedDelivery(f"task gate for vector {event.vector}")
        if gate.type not in (desc.GATE_INTERRUPT_16, desc.GATE_TRAP_16,
                             desc.GATE_INTERRUPT_32, desc.GATE_TRAP_32):
            raise DeliveryFault(GP, 8 * event.vector + ERROR_CODE_IDT + event.ext_bit)
        self._check_gate(env, event, gate)
        code, new_cpl = self._target_code_segment(env, event, gate)
        word = 4 if gate.type & 8 else 2
        old_ss, ss_base, _, ss_flags = env.segment(R_SS)
        old_esp = env.u64(OFF_REGS + 8 * RSP_INDEX)
        values = []
        if new_cpl < env.cpl:
            new_ss, esp = self._stack_from_tss32(env, new_cpl)
            ss = self._read_descriptor(env, new_ss, event)
            if ss.system or ss.is_code or not ss.type & desc.TYPE_WRITABLE or ss.dpl != new_cpl:
                raise DeliveryFault(TS, (new_ss & 0xFFFC) | event.ext_bit)
            if not ss.present:
                raise DeliveryFault(SS, (new_ss & 0xFFFC) | event.ext_bit)
            values += [old_ss, old_esp]
            ss_base, ss_flags, stack_ss = ss.base, ss.flags, (new_ss, ss)
        else:
            esp = old_esp
            stack_ss = None
        values += [rflags, env.segment(R_CS)[0], return_rip]
        if event.error_code is not None and not event.software:
            values.append(event.error_code)
        mask = 0xFFFFFFFF if ss_flags & (1 << 22) else 0xFFFF
        fmt = "<" + ("I" if word == 4 else "H") * len(values)
        frame = struct.pack(fmt, *(v & (0xFFFFFFFF if word == 4 else 0xFFFF) for v in reversed(values)))
        new_esp = (esp - len(frame)) & mask
        self._write(ss_base + new_esp, frame)
        if stack_ss is not None:
            selector, ss = stack_ss
            env.load_segment(R_SS, selector, ss.base, ss.limit, ss.flags)
        env.set_u64(OFF_REGS + 8 * RSP_INDEX, (esp & ~mask) | new_esp)
        env.load_segment(R_CS, (gate.selector & ~3) | new_cpl, code.base, code.limit, code.flags)
        env.set_u64(OFF_EIP, gate.offset if word == 4 else gate.offset & 0xFFFF)
        return self._flags_after(rflags, gate)

    def _long_mode(self, env: EnvView, event: Event, return_rip: int, rflags: int) -> int:
        gate = self._read_gate(env, event, size=16)
        if gate.type not in (desc.GATE_INTERRUPT_32, desc.GATE_TRAP_32):
            raise DeliveryFault(GP, 8 * event.vector + ERROR_CODE_IDT + event.ext_bit)
        self._check_gate(env, event, gate)
        code, new_cpl = self._target_code_segment(env, event, gate)
        if not code.long or code.big:
            raise DeliveryFault(GP, (gate.selector & 0xFFFC) | event.ext_bit)
        old_rsp = env.u64(OFF_REGS + 8 * RSP_INDEX)
        privilege_change = new_cpl < env.cpl
        if gate.ist:
            rsp = self._rsp_from_tss64(env, 36 + 8 * (gate.ist - 1), event)
        elif privilege_change:
            rsp = self._rsp_from_tss64(env, 4 + 8 * new_cpl, event)
        else:
            rsp = old_rsp
        rsp &= ~0xF
        values = [env.segment(R_SS)[0], old_rsp, rflags, env.segment(R_CS)[0], return_rip]
        if event.error_code is not None and not event.software:
            values.append(event.error_code)
        frame = struct.pack("<" + "Q" * len(values), *(v & 0xFFFFFFFFFFFFFFFF for v in reversed(values)))
        rsp = (rsp - len(frame)) & 0xFFFFFFFFFFFFFFFF
        self._write(rsp, frame)
        if privilege_change:
            # A null SS whose RPL is the new CPL, as the CPU loads it (QEMU reads CPL from SS).
            env.load_segment(R_SS, new_cpl, 0, 0, new_cpl << 13)
        env.set_u64(OFF_REGS + 8 * RSP_INDEX, rsp)
        env.load_segment(R_CS, (gate.selector & ~3) | new_cpl, code.base, code.limit, code.flags)
        env.set_u64(OFF_EIP, gate.offset)
        return self._flags_after(rflags, gate)

    # -- pieces ----------------------------------------------------------------------

    @staticmethod
    def _flags_after(rflags: int, gate: desc.Gate) -> int:
        rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if not gate.is_trap:
            rflags &= ~RFLAGS_IF
        return rflags

    def _read_gate(self, env: EnvView, event: Event, size: int) -> desc.Gate:
        _, idt_base, idt_limit, _ = env.table(OFF_IDT)
        if size * event.vector + size - 1 > idt_limit:
            raise DeliveryFault(GP, 8 * event.vector + ERROR_CODE_IDT + event.ext_bit)
        raw = self._read(idt_base + size * event.vector, size)
        return desc.parse_gate64(raw) if size == 16 else desc.parse_gate32(raw)

    @staticmethod
    def _check_gate(env: EnvView, event: Event, gate: desc.Gate) -> None:
        if event.software and gate.dpl < env.cpl:
            raise DeliveryFault(GP, 8 * event.vector + ERROR_CODE_IDT)
        if not gate.present:
            raise DeliveryFault(NP, 8 * event.vector + ERROR_CODE_IDT + event.ext_bit)

    def _target_code_segment(self, env: EnvView, event: Event, gate: desc.Gate):
        selector = gate.selector
        if selector & 0xFFFC == 0:
            raise DeliveryFault(GP, event.ext_bit)
        code = self._read_descriptor(env, selector, event)
        if not code.is_code or code.dpl > env.cpl:
            raise DeliveryFault(GP, (selector & 0xFFFC) | event.ext_bit)
        if not code.present:
            raise DeliveryFault(NP, (selector & 0xFFFC) | event.ext_bit)
        new_cpl = env.cpl if code.conforming else code.dpl
        return code, new_cpl

    def _read_descriptor(self, env: EnvView, selector: int, event: Event) -> desc.SegmentDescriptor:
        table = OFF_LDT if selector & 4 else OFF_GDT
        _, base, limit, _ = env.table(table)
        index = selector & 0xFFF8
        if index + 7 > limit:
            raise DeliveryFault(GP, (selector & 0xFFFC) | event.ext_bit)
        return desc.parse_segment_descriptor(self._read(base + index, 8))

    def _stack_from_tss32(self, env: EnvView, cpl: int) -> tuple[int, int]:
        tr_selector, base, limit, flags = env.table(OFF_TR)
        if (flags >> 8) & 7 == 1:  # a 16-bit TSS (type 1 or 3)
            offset = 2 + 4 * cpl
            if offset + 3 > limit:
                raise DeliveryFault(TS, tr_selector & 0xFFFC)
            sp, ss = struct.unpack("<HH", self._read(base + offset, 4))
            return ss, sp
        offset = 4 + 8 * cpl
        if offset + 5 > limit:
            raise DeliveryFault(TS, tr_selector & 0xFFFC)
        esp, ss = struct.unpack("<IH", self._read(base + offset, 6))
        return ss, esp

    def _rsp_from_tss64(self, env: EnvView, offset: int, event: Event) -> int:
        tr_selector, base, limit, _ = env.table(OFF_TR)
        if offset + 7 > limit:
            raise DeliveryFault(TS, (tr_selector & 0xFFFC) | event.ext_bit)
        return struct.unpack("<Q", self._read(base + offset, 8))[0]

    def _read(self, linear: int, length: int) -> bytes:
        try:
            return read_linear(self.memory, self.paging, linear, length)
        except PageFault as fault:
            raise DeliveryFault(PF, fault.error_code, cr2=fault.linear) from None
        except GuestMemoryError:
            raise DeliveryFault(GP, 0) from None

    def _write(self, linear: int, data: bytes) -> None:
        try:
            write_linear(self.memory, self.paging, linear, data)
        except PageFault as fault:
            raise DeliveryFault(PF, fault.error_code, cr2=fault.linear) from None
        except GuestMemoryError:
            raise DeliveryFault(GP, 0) from None
