"""Every KVM ioctl number pyvmm uses, computed from linux/kvm.h's definitions.

KVMIO is the ioctl "type" byte 0xAE. Sizes come from the cffi layouts in
uapi.py, so a number is right exactly when its structure is. Known values are
pinned by tests/unit/test_kvm_ioctls.py.
"""

from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from vmm.kvm.uapi import ffi

KVMIO = 0xAE


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


# System ioctls (/dev/kvm).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")

# VM ioctls.
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "__u64")
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")
KVM_SET_GSI_ROUTING = _iow(0x6A, "struct kvm_irq_routing")
KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")

# vCPU ioctls.
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr(0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")

NAMES = {value: name for name, value in globals().items() if name.startswith("KVM_")}
