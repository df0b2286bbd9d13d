"""What a PC's firmware leaves in a vCPU for the OS, set through KVM: FPU defaults, MSRs, LAPIC LINT pins.

Only machines with interrupt controllers (Linux guests) get it; a flat guest
starts from KVM's reset state.
"""

from __future__ import annotations

from devices import lapic as lapic_regs
from vmm.cpu_state import (
    MISC_ENABLE_FAST_STRINGS,
    MSR_CSTAR,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_MISC_ENABLE,
    MSR_MTRR_DEF_TYPE,
    MSR_STAR,
    MSR_SYSCALL_MASK,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
    MSR_TSC,
)
from vmm.kvm import uapi as k
from vmm.kvm.fd import VcpuFd

FPU_CONTROL_DEFAULT = 0x37F  # x87 after FNINIT: all exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80  # SSE: all exceptions masked, round to nearest

# MSRs as firmware leaves them: fast string operations on, MTRRs enabled with
# write-back as the default memory type, the syscall MSRs cleared.
BOOT_MSRS = {
    MSR_SYSENTER_CS: 0, MSR_SYSENTER_ESP: 0, MSR_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_LSTAR: 0, MSR_CSTAR: 0, MSR_SYSCALL_MASK: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_TSC: 0,
    MSR_MISC_ENABLE: MISC_ENABLE_FAST_STRINGS,
    MSR_MTRR_DEF_TYPE: (1 << 11) | 6,      # enabled, write-back
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
    for register, mode in lapic_regs.VIRTUAL_WIRE_LINT:
        value = int.from_bytes(k.ffi.buffer(lapic.regs)[register : register + 4], "little")
        value = (value & ~lapic_regs.DELIVERY_MODE_MASK & ~lapic_regs.LVT_MASKED) | (
            mode << lapic_regs.DELIVERY_MODE_SHIFT)
        k.ffi.buffer(lapic.regs)[register : register + 4] = value.to_bytes(4, "little")
    fd.set_lapic(lapic)
