"""The 64-bit entry state: GDT descriptors, identity page tables, registers."""

import struct

import pytest

from boot.pagetables import (
    BOOT_CS,
    BOOT_DS,
    BOOT_TSS,
    boot_segments,
    build_gdt,
    encode_descriptor,
    enter_long_mode,
)
from vmm.cpu_state import CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, Segment
from vmm.layout import BOOT_GDT_ADDRESS, BOOT_PML4_ADDRESS, BOOT_STACK_POINTER, ZERO_PAGE_ADDRESS
from vmm.memory import GuestMemory

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
def memory():
    mem = GuestMemory(32 * MiB)
    yield mem
    mem.close()


def test_descriptors_are_the_classic_flat_ones():
    assert encode_descriptor(Segment.flat64_code(0x10)) == 0x00AF_9B00_0000_FFFF
    assert encode_descriptor(Segment.flat_data(0x18)) == 0x00CF_9300_0000_FFFF
    assert encode_descriptor(Segment.flat32_code(0x08)) == 0x00CF_9B00_0000_FFFF
    assert encode_descriptor(Segment(base=0x1234_5678, limit=0x67, type=0xB, s=False)) == 0x1200_8B34_5678_0067


def test_gdt_has_boot_cs_and_ds_where_the_protocol_wants_them():
    assert (BOOT_CS, BOOT_DS) == (0x10, 0x18)
    gdt = struct.unpack("<6Q", build_gdt(boot_segments()))
    assert gdt[0] == gdt[1] == 0
    assert gdt[2] == 0x00AF_9B00_0000_FFFF
    assert gdt[3] == 0x00CF_9300_0000_FFFF
    assert gdt[BOOT_TSS // 8] == 0x0000_8B00_0000_0067
    assert gdt[5] == 0


def translate(memory, cr3, address):
    """Walk 4-level page tables with 2 MiB pages, as the CPU would."""
    pml4e = memory.read_u64(cr3 + ((address >> 39) & 511) * 8)
    assert pml4e & 1, "PML4 entry not present"
    pdpte = memory.read_u64((pml4e & ~0xFFF) + ((address >> 30) & 511) * 8)
    assert pdpte & 1 and not pdpte & 0x80, "PDPT entry not present or a 1 GiB page"
    pde = memory.read_u64((pdpte & ~0xFFF) + ((address >> 21) & 511) * 8)
    assert pde & 0x83 == 0x83, "not a present, writable 2 MiB page"
    return (pde & ~(2 * MiB - 1) & ((1 << 52) - 1)) | (address & (2 * MiB - 1))


def test_entry_state(memory):
    state = enter_long_mode(memory, entry=0x100_0200, boot_params=ZERO_PAGE_ADDRESS)
    assert state.regs["rip"] == 0x100_0200
    assert state.regs["rsi"] == ZERO_PAGE_ADDRESS
    assert state.regs["rsp"] == BOOT_STACK_POINTER
    assert state.regs["rflags"] == 0x2  # interrupts off
    assert state.cr0 == CR0_PE | CR0_PG | CR0_ET | CR0_NE
    assert state.cr4 & CR4_PAE
    assert state.efer == EFER_LME | EFER_LMA
    assert state.cr3 == BOOT_PML4_ADDRESS
    cs = state.segments["cs"]
    assert (cs.selector, cs.l, cs.db, cs.type) == (0x10, True, False, 0xB)
    for name in ("ds", "es", "ss", "fs", "gs"):
        assert state.segments[name].selector == 0x18
    assert state.gdt == (BOOT_GDT_ADDRESS, 47)
    # The GDT in guest memory is the one the hidden segment state came from.
    gdt = memory.read(BOOT_GDT_ADDRESS, 48)
    assert struct.unpack_from("<Q", gdt, 0x10)[0] == encode_descriptor(cs)
    assert struct.unpack_from("<Q", gdt, 0x18)[0] == encode_descriptor(state.segments["ds"])


@pytest.mark.parametrize("address", [0, 0x7000, 0x100_0200, 0x7FFF_F123, 0xC000_0000, 0xFEE0_0000,
                                     4 * GiB - 1])
def test_first_4_gib_are_identity_mapped(memory, address):
    state = enter_long_mode(memory, entry=0x100_0000, boot_params=ZERO_PAGE_ADDRESS)
    assert translate(memory, state.cr3, address) == address


def test_page_tables_do_not_overlap_the_zero_page_or_gdt(memory):
    enter_long_mode(memory, entry=0x100_0000, boot_params=ZERO_PAGE_ADDRESS)
    tables = range(BOOT_PML4_ADDRESS, BOOT_PML4_ADDRESS + 6 * 4096)
    assert ZERO_PAGE_ADDRESS + 4096 <= tables.start
    assert BOOT_GDT_ADDRESS + 48 <= ZERO_PAGE_ADDRESS
