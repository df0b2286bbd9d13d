"""The software CPU's CPUID against what its engine does: the features it shows are enforced,
and the bits that report CPU state (OSXSAVE, OSPKE, XSAVE sizes) follow that state."""

from __future__ import annotations

import struct

import pytest

from tests.unit.tcg_support import TcgMachine, assemble

CR4_OSXSAVE, CR4_SMAP, CR4_PKE = 1 << 18, 1 << 21, 1 << 22
XSAVE, OSXSAVE = 1 << 26, 1 << 27
SMAP = 1 << 20
PKU, OSPKE = 1 << 3, 1 << 4
X87_SSE_PKRU = 0x203
LEGACY_AREA_AND_HEADER = 576
WITH_PKRU = 0xA80 + 8  # PKRU's offset plus its size

# Each `REPORT reg` writes the register's 32 bits to the output port.
GUEST = """
    .code16
.macro REPORT reg
    mov %\\reg, %eax
    mov $0xe9, %dx
    outl %eax, %dx
.endm
.macro QUERY leaf, subleaf
    mov $\\leaf, %eax
    mov $\\subleaf, %ecx
    cpuid
.endm
    QUERY 1, 0
    REPORT ecx
    mov %cr4, %eax
    or $(1 << 18 | 1 << 21 | 1 << 22), %eax   /* OSXSAVE, SMAP, PKE */
    mov %eax, %cr4
    mov %cr4, %eax
    REPORT eax                                /* a bit the engine's model lacks would not stick */
    QUERY 1, 0
    REPORT ecx
    QUERY 7, 0
    REPORT ebx
    REPORT ecx
    xor %ecx, %ecx
    xgetbv
    REPORT eax
    QUERY 0xd, 0
    REPORT eax
    REPORT ebx
    REPORT ecx
    mov $0x203, %eax
    xor %edx, %edx
    xor %ecx, %ecx
    xsetbv
    QUERY 0xd, 0
    REPORT ebx
    QUERY 0xd, 9
    REPORT eax
    REPORT ebx
    mov $0, %al
    out %al, $0xf4
    hlt
"""


def test_cpuid_shows_what_the_engine_enforces_and_follows_cr4_and_xcr0(machine, tmp_path):
    machine.load(assemble(GUEST, tmp_path))
    machine.run()
    assert machine.exit.status == 0
    (leaf1_before, cr4, leaf1_after, leaf7_ebx, leaf7_ecx, xcr0_at_reset, components, size_enabled, size_all,
     size_after_xsetbv, pkru_size, pkru_offset) = struct.unpack("<12I", machine.output.data)
    assert leaf1_before & XSAVE and not leaf1_before & OSXSAVE
    assert cr4 & (CR4_OSXSAVE | CR4_SMAP | CR4_PKE) == CR4_OSXSAVE | CR4_SMAP | CR4_PKE
    assert leaf1_after & OSXSAVE
    assert leaf7_ebx & SMAP
    assert leaf7_ecx & (PKU | OSPKE) == PKU | OSPKE
    assert xcr0_at_reset == 1  # x87 only, as a CPU leaves reset
    assert components == X87_SSE_PKRU  # no AVX state: this engine has no AVX instructions
    assert (size_enabled, size_all) == (LEGACY_AREA_AND_HEADER, WITH_PKRU)
    assert size_after_xsetbv == WITH_PKRU
    assert (pkru_size, pkru_offset) == (8, 0xA80)


IDENTITY = """
    .code16
    xor %eax, %eax
    cpuid
    mov %edx, %esi
    mov $0xe9, %dx
    mov %ebx, %eax
    outl %eax, %dx
    mov %esi, %eax
    outl %eax, %dx
    mov %ecx, %eax
    outl %eax, %dx
    mov $1, %eax
    cpuid
    mov $0xe9, %dx
    outl %eax, %dx
    mov $0, %al
    out %al, $0xf4
    hlt
"""


@pytest.mark.parametrize("vendor, name, signature", [
    (None, b"GenuineIntel", 0x306C4),  # Haswell's family/model (vmm/tcg/cpuid.py says why)
    ("amd", b"AuthenticAMD", 0x830F10),  # EPYC-Rome's own: family 0x17, model 0x31
])
def test_cpu_vendor_chooses_the_engines_model_and_what_cpuid_says(tmp_path, vendor, name, signature):
    machine = TcgMachine(cpu_vendor=vendor)
    try:
        machine.load(assemble(IDENTITY, tmp_path))
        machine.run()
        assert machine.exit.status == 0
        assert machine.output.data[:12] == name
        assert struct.unpack_from("<I", machine.output.data, 12)[0] == signature
        assert machine.vm.engine.vendor == (vendor or "intel")
    finally:
        machine.close()


FAST_STRINGS_GUEST = """
    .code16
    mov $0x1a0, %ecx          /* IA32_MISC_ENABLE */
    rdmsr
    mov $0xe9, %dx
    outl %eax, %dx
    mov $7, %eax
    xor %ecx, %ecx
    cpuid
    mov %ebx, %eax
    mov $0xe9, %dx
    outl %eax, %dx
    mov $0, %al
    out %al, $0xf4
    hlt
"""
MISC_ENABLE_FAST_STRINGS = 1
ERMS = 1 << 9


def test_fast_strings_are_on_and_erms_is_not_shown(machine, tmp_path):
    """As firmware leaves a CPU (and as QEMU's TCG guest finds it), so Linux clears and copies
    with `rep stosq`/`rep movsq`; without ERMS, not byte by byte with `rep stosb`/`rep movsb`,
    one translated block per byte on this engine (vmm/tcg/cpuid.py)."""
    machine.load(assemble(FAST_STRINGS_GUEST, tmp_path))
    machine.run()
    assert machine.exit.status == 0
    misc_enable, leaf7_ebx = struct.unpack("<2I", machine.output.data)
    assert misc_enable & MISC_ENABLE_FAST_STRINGS
    assert not leaf7_ebx & ERMS
