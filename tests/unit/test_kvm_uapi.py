"""The cffi layouts match the kernel's uapi headers (sizes and offsets from linux/kvm.h, x86_64),
both as parsed ahead of time (vmm/cffi_prebuilt.py, what `make install` builds) and as parsed at
import when nothing was built."""

import sys

import pytest

from vmm import cffi_prebuilt
from vmm.kvm.uapi import DECLARATIONS

PREBUILT_NAME = "pyvmm_test_uapi_prebuilt"


@pytest.fixture(scope="module")
def prebuilt_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prebuilt")
    cffi_prebuilt.write(DECLARATIONS, PREBUILT_NAME, str(directory / f"{PREBUILT_NAME}.py"))
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop(PREBUILT_NAME, None)


@pytest.fixture(scope="module", params=["prebuilt", "in-line"])
def ffi(request, prebuilt_dir):
    if request.param == "in-line":
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(cffi_prebuilt.INLINE_ENV, "1")
            loaded = cffi_prebuilt.load(DECLARATIONS, PREBUILT_NAME)
        assert type(loaded).__module__ == "cffi.api"  # parsed here, by pycparser
        return loaded
    loaded = cffi_prebuilt.load(DECLARATIONS, PREBUILT_NAME)
    assert loaded is sys.modules[PREBUILT_NAME].ffi
    return loaded


def test_a_prebuilt_module_from_other_declarations_is_not_used(prebuilt_dir, monkeypatch):
    monkeypatch.delenv(cffi_prebuilt.INLINE_ENV, raising=False)
    changed = DECLARATIONS + "struct added_later { int x; };"
    loaded = cffi_prebuilt.load(changed, PREBUILT_NAME)
    assert loaded is not sys.modules[PREBUILT_NAME].ffi
    assert loaded.sizeof("struct added_later") == 4


def test_a_missing_prebuilt_module_means_parsing_in_line(monkeypatch):
    monkeypatch.delenv(cffi_prebuilt.INLINE_ENV, raising=False)
    loaded = cffi_prebuilt.load(DECLARATIONS, "pyvmm_no_such_prebuilt_module")
    assert loaded.sizeof("struct kvm_run") == 2352

SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_sregs": 312,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_fpu": 416,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_irq_level": 8,
    "struct kvm_irq_routing_entry": 48,
    "struct kvm_irq_routing": 8,
    "struct kvm_pit_config": 64,
    "struct kvm_pic_state": 16,
    "struct kvm_irqchip": 520,
    "struct kvm_irqfd": 32,
    "struct kvm_ioeventfd": 64,
    "struct kvm_lapic_state": 1024,
    "struct kvm_mp_state": 4,
    "struct kvm_translation": 24,
    "struct kvm_run": 2352,
}

OFFSETS = [
    ("struct kvm_run", "immediate_exit", 1),
    ("struct kvm_run", "exit_reason", 8),
    ("struct kvm_run", "if_flag", 13),
    ("struct kvm_run", "cr8", 16),
    ("struct kvm_run", "apic_base", 24),
    ("struct kvm_run", "io", 32),
    ("struct kvm_run", "mmio", 32),
    ("struct kvm_run", "internal", 32),
    ("struct kvm_run", "system_event", 32),
    ("struct kvm_run", "fail_entry", 32),
    ("struct kvm_run", "kvm_valid_regs", 288),
    ("struct kvm_run", "s", 304),
    ("struct kvm_regs", "rip", 128),
    ("struct kvm_regs", "rflags", 136),
    ("struct kvm_sregs", "tr", 144),
    ("struct kvm_sregs", "gdt", 192),
    ("struct kvm_sregs", "idt", 208),
    ("struct kvm_sregs", "cr0", 224),
    ("struct kvm_sregs", "efer", 264),
    ("struct kvm_sregs", "apic_base", 272),
    ("struct kvm_sregs", "interrupt_bitmap", 280),
    ("struct kvm_segment", "selector", 12),
    ("struct kvm_segment", "type", 14),
    ("struct kvm_segment", "unusable", 22),
    ("struct kvm_fpu", "fcw", 128),
    ("struct kvm_fpu", "last_ip", 136),
    ("struct kvm_fpu", "xmm", 152),
    ("struct kvm_fpu", "mxcsr", 408),
    ("struct kvm_msrs", "entries", 8),
    ("struct kvm_msr_entry", "data", 8),
    ("struct kvm_cpuid2", "entries", 8),
    ("struct kvm_cpuid_entry2", "eax", 12),
    ("struct kvm_cpuid_entry2", "edx", 24),
    ("struct kvm_userspace_memory_region", "guest_phys_addr", 8),
    ("struct kvm_userspace_memory_region", "userspace_addr", 24),
    ("struct kvm_irqfd", "resamplefd", 12),
    ("struct kvm_ioeventfd", "addr", 8),
    ("struct kvm_ioeventfd", "fd", 20),
    ("struct kvm_ioeventfd", "flags", 24),
    ("struct kvm_translation", "valid", 16),
    ("struct kvm_irq_routing_entry", "u", 16),
    ("struct kvm_irq_routing", "entries", 8),
    ("struct kvm_pic_state", "imr", 2),
    ("struct kvm_pic_state", "irq_base", 5),
    ("struct kvm_pic_state", "elcr_mask", 15),
    ("struct kvm_irqchip", "chip", 8),
]

# Offsets inside the kvm_run union members.
MEMBER_OFFSETS = [
    ("io", "direction", 0), ("io", "size", 1), ("io", "port", 2), ("io", "count", 4),
    ("io", "data_offset", 8),
    ("mmio", "phys_addr", 0), ("mmio", "data", 8), ("mmio", "len", 16), ("mmio", "is_write", 20),
    ("internal", "suberror", 0), ("internal", "ndata", 4), ("internal", "data", 8),
    ("system_event", "type", 0), ("system_event", "ndata", 4), ("system_event", "data", 8),
    ("fail_entry", "hardware_entry_failure_reason", 0), ("fail_entry", "cpu", 8),
]


@pytest.mark.parametrize(("ctype", "size"), SIZES.items())
def test_sizes(ffi, ctype, size):
    assert ffi.sizeof(ctype) == size


@pytest.mark.parametrize(("ctype", "field", "offset"), OFFSETS)
def test_offsets(ffi, ctype, field, offset):
    assert ffi.offsetof(ctype, field) == offset


@pytest.mark.parametrize(("member", "field", "offset"), MEMBER_OFFSETS)
def test_kvm_run_union_members(ffi, member, field, offset):
    run = ffi.new("struct kvm_run *")
    base = int(ffi.cast("uintptr_t", ffi.addressof(run[0], member)))
    field_address = int(ffi.cast("uintptr_t", ffi.addressof(getattr(run, member), field)))
    assert field_address - base == offset
