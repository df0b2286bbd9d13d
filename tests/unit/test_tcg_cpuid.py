"""The software CPU's CPUID against what its engine does: the features it shows are enforced,
and the bits that report CPU state (OSXSAVE, OSPKE, XSAVE sizes) follow that state."""

from __future__ import annotations

import struct

from tests.unit.tcg_support import assemble

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
