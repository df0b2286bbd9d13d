"""SYSCALL and SYSENTER as the SDM defines them; Unicorn only calls the hook and then advances RIP.

A 64-bit kernel's SYSCALL never gets here: the engine does it itself
(vmm/tcg/native_syscall.py). This is SYSCALL outside long mode or with
EFER.SCE clear, and SYSENTER.

Called from the instruction hooks, on the live engine state. Unicorn has
synchronised RIP to the instruction and will add the instruction's length
to RIP after the hook returns, so the new RIP is written that much short of
the target. SYSRET and SYSEXIT need nothing: QEMU's own implementations run.

64-bit mode:  RCX <- next RIP, R11 <- RFLAGS, RFLAGS &= ~SFMASK (and RF),
              CS <- STAR[47:32] & ~3 (flat 64-bit code, DPL 0),
              SS <- STAR[47:32] + 8 (flat data, DPL 0), RIP <- LSTAR
              (CSTAR from compatibility mode).
Legacy mode:  ECX <- next EIP, RFLAGS &= ~(IF | VM | RF), flat 32-bit CS/SS,
              EIP <- STAR[31:0].
With EFER.SCE clear the instruction raises #UD.

SYSENTER:     CS <- SYSENTER_CS & ~3 (flat, 64-bit when EFER.LMA is set),
              SS <- CS + 8, RSP <- SYSENTER_ESP, RIP <- SYSENTER_EIP,
              RFLAGS &= ~(IF | VM | RF). #GP(0) when SYSENTER_CS is 0;
              #UD in long mode on an AMD CPU (`--cpu-vendor amd`).
              (Real mode is QEMU's: #GP before the hook. The 32-bit vDSO of
              a 64-bit Linux on an Intel CPU enters the kernel this way.)
"""

from __future__ import annotations

from vmm.cpu_state import (
    EFER_LMA,
    EFER_SCE,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
    RFLAGS_IF,
    RFLAGS_RF,
    RFLAGS_VM,
)
from vmm.tcg.engine import Engine, x86
from vmm.tcg.qemu_env import (
    OFF_CSTAR,
    OFF_EFER,
    OFF_EIP,
    OFF_FMASK,
    OFF_LSTAR,
    OFF_REGS,
    OFF_STAR,
    R_CS,
    R_SS,
    descriptor_flags,
)

DESC_L = 1 << 21
RCX, RSP, R11 = 1, 4, 11  # slots in QEMU's register file

FLAT_CODE64 = descriptor_flags(0xB, s=True, dpl=0, present=True, avl=False, l=True, db=False, g=True)
FLAT_CODE32 = descriptor_flags(0xB, s=True, dpl=0, present=True, avl=False, l=False, db=True, g=True)
FLAT_DATA = descriptor_flags(0x3, s=True, dpl=0, present=True, avl=False, l=False, db=True, g=True)

PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF2, 0xF3}) | set(range(0x40, 0x50))


def instruction_length(code: bytes) -> int:
    """Length of a SYSCALL (0F 05) or SYSENTER (0F 34) with whatever prefixes precede it."""
    length = 0
    while length < len(code) and code[length] in PREFIXES:
        length += 1
    return length + 2


class InstructionFault(Exception):
    """The instruction faults instead: the guest gets `vector` (with `error_code`) at the instruction."""

    vector: int
    error_code: int | None = None


class SyscallNotEnabled(InstructionFault):
    """EFER.SCE is clear: #UD."""

    vector = 6


class SysenterInLongModeOnAmd(InstructionFault):
    """AMD CPUs have no SYSENTER in long mode: #UD."""

    vector = 6


class SysenterNotSetUp(InstructionFault):
    """SYSENTER_CS is zero: #GP(0)."""

    vector, error_code = 13, 0


def emulate_syscall(engine: Engine, fetch_code) -> None:
    """Perform SYSCALL on the live state. `fetch_code(rip, n)` reads instruction bytes."""
    rflags = engine.reg(x86.UC_X86_REG_RFLAGS)
    env = engine.context.save()
    efer = env.u64(OFF_EFER)
    if not efer & EFER_SCE:
        raise SyscallNotEnabled()
    rip = env.u64(OFF_EIP)
    length = instruction_length(fetch_code(rip, 15))
    next_rip = rip + length
    star = env.u64(OFF_STAR)
    selector = (star >> 32) & 0xFFFC
    if efer & EFER_LMA:
        compat = not env.segment(R_CS)[3] & DESC_L
        target = env.u64(OFF_CSTAR if compat else OFF_LSTAR)
        env.set_u64(OFF_REGS + 8 * RCX, next_rip)
        env.set_u64(OFF_REGS + 8 * R11, rflags)
        new_rflags = rflags & ~(env.u64(OFF_FMASK) | RFLAGS_RF)
        env.load_segment(R_CS, selector, 0, 0xFFFFFFFF, FLAT_CODE64)
    else:
        target = star & 0xFFFFFFFF
        env.set_u64(OFF_REGS + 8 * RCX, next_rip & 0xFFFFFFFF)
        new_rflags = rflags & ~(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF)
        env.load_segment(R_CS, selector, 0, 0xFFFFFFFF, FLAT_CODE32)
    env.load_segment(R_SS, selector + 8, 0, 0xFFFFFFFF, FLAT_DATA)
    env.set_u64(OFF_EIP, target - length)  # Unicorn adds the length when the hook returns
    env.clear_exception_in_flight()
    engine.context.restore()
    engine.write_reg(x86.UC_X86_REG_RFLAGS, new_rflags)


def emulate_sysenter(engine: Engine, fetch_code) -> None:
    """Perform SYSENTER on the live state. `fetch_code(rip, n)` reads instruction bytes."""
    if engine.vendor == "amd" and engine.context.save().u64(OFF_EFER) & EFER_LMA:
        raise SysenterInLongModeOnAmd()
    selector = engine.read_msr(MSR_SYSENTER_CS) & 0xFFFC
    if selector == 0:
        raise SysenterNotSetUp()
    stack, target = engine.read_msr(MSR_SYSENTER_ESP), engine.read_msr(MSR_SYSENTER_EIP)
    rflags = engine.reg(x86.UC_X86_REG_RFLAGS)
    env = engine.context.save()
    rip = env.u64(OFF_EIP)
    length = instruction_length(fetch_code(rip, 15))
    if env.u64(OFF_EFER) & EFER_LMA:
        env.load_segment(R_CS, selector, 0, 0xFFFFFFFF, FLAT_CODE64)
    else:
        env.load_segment(R_CS, selector, 0, 0xFFFFFFFF, FLAT_CODE32)
        stack, target = stack & 0xFFFFFFFF, target & 0xFFFFFFFF
    env.load_segment(R_SS, selector + 8, 0, 0xFFFFFFFF, FLAT_DATA)
    env.set_u64(OFF_REGS + 8 * RSP, stack)
    env.set_u64(OFF_EIP, target - length)  # Unicorn adds the length when the hook returns
    env.clear_exception_in_flight()
    engine.context.restore()
    engine.write_reg(x86.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF))
