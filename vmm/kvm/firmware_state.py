"""What a PC's firmware leaves in a vCPU for the OS, set through KVM: FPU defaults, MSRs, LAPIC LINT pins.

Only machines with interrupt controllers (Linux guests) get it; a flat guest
starts from KVM's reset state.
"""

from __future__ import annotations

from devices import lapic as lapic_regs
from vmm.kvm import uapi as k
from vmm.kvm.fd import VcpuFd

FPU_CONTROL_DEFAULT = 0x37F  # x87 after FNINIT: all exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # SSE: all exceptions masked, round to nearest

# MSRs as firmware leaves them: fast string operations on, MTRRs enabled with
# write-back as the default memory type, the syscall MSRs cleared.
BOOT_MSRS = {
    0x174: 0, 0x175: 0, 0x176: 0,          # IA32_SYSENTER_CS/ESP/EIP
    0xC0000081: 0, 0xC0000082: 0,          # STAR, LSTAR
    0xC0000083: 0, 0xC0000084: 0,          # CSTAR, SYSCALL_MASK
    0xC0000102: 0,                         # KERNEL_GS_BASE
    0x10: 0,                               # TSC
    0x1A0: 1,                              # IA32_MISC_ENABLE: fast strings
    0x2FF: (1 << 11) | 6,                  # MTRRdefType: enabled, write-back
}


def set_firmware_state(fd: VcpuFd) -> None:
    """FPU defaults, BOOT_MSRS, and the local APIC's LINT pins in virtual wire mode."""
    fpu = k.ffi.new("struct kvm_fpu *")
    fpu.fcw = FPU_CONTROL_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    fd.set_fpu(fpu)
    fd.set_msrs(BOOT_MSRS)
    # Through-the-8259 interrupts arrive on LINT0 (ExtINT), NMIs on LINT1,
    # as the MP specification's virtual wire mode has it.
    lapic = fd.get_lapic()
    for register, mode in ((lapic_regs.REG_LVT_LINT0, lapic_regs.EXTINT), (lapic_regs.REG_LVT_LINT1, lapic_regs.NMI)):
        value = int.from_bytes(k.ffi.buffer(lapic.regs)[register : register + 4], "little")
        value = (value & ~0x700 & ~lapic_regs.LVT_MASKED) | (mode << 8)
        k.ffi.buffer(lapic.regs)[register : register + 4] = value.to_bytes(4, "little")
    fd.set_lapic(lapic)
