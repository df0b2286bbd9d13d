"""An accelerator-neutral description of a vCPU's architectural state.

Boot loaders describe how a vCPU must start (real mode at CS:IP, or 64-bit
mode with page tables and a zero page) as a `CpuState`; each accelerator
translates it into its own registers. Nothing here knows about KVM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Control register, EFER and RFLAGS bits (Intel SDM vol. 3, 2.5 and 2.2.1; vol. 1, 3.4.3),
# here once for the loaders, both accelerators and the page walker.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 of RFLAGS always reads as one
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

# Model-specific register indexes (SDM vol. 4, table 2-2).
MSR_TSC = 0x10
MSR_SYSENTER_CS = 0x174
MSR_SYSENTER_ESP = 0x175
MSR_SYSENTER_EIP = 0x176
MSR_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRINGS = 1 << 0  # as firmware leaves a CPU
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache, as KVM's kvm_segment holds it."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3  # read/write data, accessed
    present: bool = True
    dpl: int = 0
    db: bool = False  # default operand size 32 bit
    s: bool = True  # code/data (not a system segment)
    l: bool = False  # 64-bit code  # noqa: E741 - the architectural name
    g: bool = False  # limit in 4 KiB units
    avl: bool = False
    unusable: bool = False

    @classmethod
    def real_mode(cls, selector: int, code: bool = False) -> Segment:
        return cls(selector=selector, base=selector << 4, limit=0xFFFF, type=0xB if code else 0x3)

    @classmethod
    def flat64_code(cls, selector: int) -> Segment:
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB, l=True, g=True)

    @classmethod
    def flat32_code(cls, selector: int) -> Segment:
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0xB, db=True, g=True)

    @classmethod
    def flat_data(cls, selector: int) -> Segment:
        return cls(selector=selector, base=0, limit=0xFFFFFFFF, type=0x3, db=True, g=True)

    @classmethod
    def tss(cls, selector: int = 0, base: int = 0, limit: int = 0xFFFF) -> Segment:
        return cls(selector=selector, base=base, limit=limit, type=0xB, s=False)

    @classmethod
    def ldt(cls) -> Segment:
        return cls(selector=0, base=0, limit=0xFFFF, type=0x2, s=False)


def _real_mode_segments(cs: int) -> dict[str, Segment]:
    segs = {name: Segment.real_mode(0) for name in ("ds", "es", "fs", "gs", "ss")}
    segs["cs"] = Segment.real_mode(cs, code=True)
    segs["tr"] = Segment.tss()
    segs["ldt"] = Segment.ldt()
    return segs


@dataclass
class CpuState:
    """Registers to load into a vCPU before it first runs.

    `regs` holds the general registers plus `rip` and `rflags`; anything not
    named is zero.
    """

    regs: dict[str, int] = field(default_factory=dict)
    segments: dict[str, Segment] = field(default_factory=lambda: _real_mode_segments(0))
    gdt: tuple[int, int] = (0, 0xFFFF)  # (base, limit)
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = CR0_ET | CR0_NE
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    @classmethod
    def real_mode(cls, cs: int, ip: int) -> CpuState:
        """16-bit real mode at CS:IP with RFLAGS = 0x2 and every other register zero."""
        return cls(regs={"rip": ip, "rflags": RFLAGS_RESERVED}, segments=_real_mode_segments(cs))

    def reg(self, name: str) -> int:
        return self.regs.get(name, 0)
