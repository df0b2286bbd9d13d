"""Loading a `CpuState` into the software CPU, and reading registers back for diagnostics.

Segment registers are loaded with their hidden descriptor caches (base,
limit, attributes) exactly as given, the way KVM_SET_SREGS loads them, so a
boot loader can start the vCPU in real, protected or 64-bit mode without the
guest executing a single instruction first.
"""

from __future__ import annotations

from vmm.cpu_state import GPR_NAMES, CpuState, Segment
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
    R_DS,
    R_ES,
    R_FS,
    R_GS,
    R_SS,
    descriptor_flags,
)

# QEMU keeps the general registers in x86 encoding order.
QEMU_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# CS first (it decides 16/32/64-bit code), SS last (it decides the CPL, and
# the final hflags computation must see every data segment base).
LOAD_ORDER = (("cs", R_CS), ("ds", R_DS), ("es", R_ES), ("fs", R_FS), ("gs", R_GS), ("ss", R_SS))


def segment_flags(segment: Segment) -> int:
    if segment.unusable:
        return 0  # not present: QEMU has no separate "unusable" bit
    return descriptor_flags(segment.type, segment.s, segment.dpl, segment.present, segment.avl,
                            segment.l, segment.db, segment.g)


def load_cpu_state(engine: Engine, state: CpuState) -> None:
    env = engine.context.save()
    env.set_control_registers(state.cr0, state.cr3, state.cr4, state.efer)
    for name, index in LOAD_ORDER:
        segment = state.segments.get(name) or Segment()
        env.load_segment(index, segment.selector, segment.base, segment.limit, segment_flags(segment))
    for name, offset in (("tr", OFF_TR), ("ldt", OFF_LDT)):
        segment = state.segments.get(name) or Segment(unusable=True)
        env.set_table(offset, segment.selector, segment.base, segment.limit, segment_flags(segment))
    env.set_table(OFF_GDT, 0, state.gdt[0], state.gdt[1])
    env.set_table(OFF_IDT, 0, state.idt[0], state.idt[1])
    for i, name in enumerate(QEMU_GPR_ORDER):
        env.set_u64(OFF_REGS + 8 * i, state.reg(name))
    env.set_u64(OFF_EIP, state.reg("rip"))
    env.clear_exception_in_flight()
    engine.context.restore()
    engine.flush_tlb()  # CR3 and paging mode changed behind QEMU's back
    # RFLAGS through the API: QEMU keeps the arithmetic flags apart (lazily computed).
    engine.write_reg(x86.UC_X86_REG_RFLAGS, state.reg("rflags") | 2)


DIAGNOSTIC_REGS = tuple(getattr(x86, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES) + (
    x86.UC_X86_REG_RIP, x86.UC_X86_REG_RFLAGS, x86.UC_X86_REG_CR0, x86.UC_X86_REG_CR2,
    x86.UC_X86_REG_CR3, x86.UC_X86_REG_CR4,
)
DIAGNOSTIC_NAMES = GPR_NAMES + ("rip", "rflags", "cr0", "cr2", "cr3", "cr4")


def read_registers(engine: Engine) -> dict[str, int]:
    values = dict(zip(DIAGNOSTIC_NAMES, engine.read_regs(DIAGNOSTIC_REGS), strict=True))
    env = engine.context.save()
    values["efer"] = env.u64(OFF_EFER)
    for name, index in LOAD_ORDER:
        values[name] = env.segment(index)[0]
    return values
