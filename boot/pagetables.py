"""Long mode for the kernel's 64-bit entry: GDT, identity page tables, registers.

The 64-bit boot protocol wants: paging on, an identity map covering the
kernel, the zero page and the command line; a GDT with flat 4 GiB segments at
__BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18, read/write) loaded into
CS and DS/ES/SS; interrupts off; RSI = address of boot_params. This module
writes the GDT and page tables into guest memory and returns the matching
`CpuState`. The segment registers' hidden parts are derived from the very
descriptors written to the GDT, so the two cannot disagree (a software CPU may
reload them from the table).

The identity map covers the first 4 GiB with 2 MiB pages, enough for every
address the loader hands the kernel (all below 4 GiB); the kernel builds its
own page tables straight away.
"""

from __future__ import annotations

import struct

from vmm.cpu_state import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    RFLAGS_RESERVED,
    CpuState,
    Segment,
)
from vmm.layout import (
    BOOT_GDT_ADDRESS,
    BOOT_PD_ADDRESS,
    BOOT_PDPT_ADDRESS,
    BOOT_PML4_ADDRESS,
    BOOT_STACK_POINTER,
    GiB,
    MiB,
)
from vmm.memory import GuestMemory

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20  # a 16-byte system descriptor (slots 4 and 5)
GDT_SLOTS = 6
TSS_LIMIT = 0x67  # the minimal 64-bit TSS
TSS_TYPE_BUSY_64 = 0xB

PAGE_PRESENT = 1 << 0
PAGE_WRITABLE = 1 << 1
PAGE_SIZE_2M = 1 << 7  # PS bit in a page-directory entry
IDENTITY_MAPPED = 4 * GiB
PD_COUNT = IDENTITY_MAPPED // GiB  # one page directory per GiB
ENTRIES_PER_TABLE = 512


def encode_descriptor(segment: Segment) -> int:
    """The 8-byte GDT descriptor for a code/data segment (or the low half of a system one)."""
    limit = segment.limit >> 12 if segment.g else segment.limit
    access = (segment.present << 7) | (segment.dpl << 5) | (segment.s << 4) | segment.type
    flags = (segment.g << 3) | (segment.db << 2) | (segment.l << 1) | segment.avl
    return (
        (limit & 0xFFFF)
        | (segment.base & 0xFF_FFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | flags << 52
        | ((segment.base >> 24) & 0xFF) << 56
    )


def boot_segments() -> dict[str, Segment]:
    """The segment registers at the 64-bit entry, keyed by register name."""
    data = Segment.flat_data(BOOT_DS)
    segments = {name: data for name in ("ds", "es", "fs", "gs", "ss")}
    segments["cs"] = Segment.flat64_code(BOOT_CS)
    segments["tr"] = Segment(selector=BOOT_TSS, base=0, limit=TSS_LIMIT, type=TSS_TYPE_BUSY_64, s=False)
    segments["ldt"] = Segment.ldt()
    return segments


def build_gdt(segments: dict[str, Segment]) -> bytes:
    slots = [0] * GDT_SLOTS
    slots[BOOT_CS // 8] = encode_descriptor(segments["cs"])
    slots[BOOT_DS // 8] = encode_descriptor(segments["ds"])
    tr = segments["tr"]
    slots[BOOT_TSS // 8] = encode_descriptor(tr)
    slots[BOOT_TSS // 8 + 1] = tr.base >> 32  # upper half of the 16-byte system descriptor
    return struct.pack(f"<{GDT_SLOTS}Q", *slots)


def build_identity_page_tables(pml4: int, pdpt: int, pd: int) -> dict[int, bytes]:
    """Page tables mapping [0, 4 GiB) to itself with 2 MiB pages: {guest address: table}."""
    table_flags = PAGE_PRESENT | PAGE_WRITABLE
    tables = {
        pml4: struct.pack("<Q", pdpt | table_flags).ljust(4096, b"\0"),
        pdpt: struct.pack(f"<{PD_COUNT}Q", *(pd + i * 4096 | table_flags for i in range(PD_COUNT)))
        .ljust(4096, b"\0"),
    }
    large_page = table_flags | PAGE_SIZE_2M
    entries = PD_COUNT * ENTRIES_PER_TABLE
    tables[pd] = struct.pack(f"<{entries}Q", *(i * 2 * MiB | large_page for i in range(entries)))
    return tables


def enter_long_mode(memory: GuestMemory, entry: int, boot_params: int) -> CpuState:
    """Write the GDT and page tables; return the vCPU state at the kernel's 64-bit entry."""
    segments = boot_segments()
    gdt = build_gdt(segments)
    memory.write(BOOT_GDT_ADDRESS, gdt)
    for address, table in build_identity_page_tables(
        BOOT_PML4_ADDRESS, BOOT_PDPT_ADDRESS, BOOT_PD_ADDRESS
    ).items():
        memory.write(address, table)
    return CpuState(
        regs={
            "rip": entry,
            "rsi": boot_params,
            "rsp": BOOT_STACK_POINTER,
            "rbp": BOOT_STACK_POINTER,
            "rflags": RFLAGS_RESERVED,  # IF clear: interrupts off
        },
        segments=segments,
        gdt=(BOOT_GDT_ADDRESS, len(gdt) - 1),
        idt=(0, 0),
        cr0=CR0_PE | CR0_PG | CR0_ET | CR0_NE,
        cr3=BOOT_PML4_ADDRESS,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
