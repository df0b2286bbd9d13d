"""Linear-to-physical translation through the guest's page tables, for the VMM's own accesses.

When pyvmm delivers an interrupt on the software CPU it reads the IDT, GDT
and TSS and pushes the interrupt frame itself, at linear addresses. It
walks the guest's page tables the way the CPU would for a supervisor access
(32-bit, PAE and 4-level paging) and reports a fault as `PageFault` with the
architectural error code, so the caller can turn it into the right
exception. The gdb stub translates the debugger's addresses with it too, on
either accelerator (vmm/gdb/debugger.py).

Accessed and dirty bits are not updated: the structures touched here (IDT,
GDT, TSS, kernel stacks) are kernel mappings, which Linux creates with both
bits already set.
"""

from __future__ import annotations

from vmm.cpu_state import CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA
from vmm.memory import GuestMemory

PTE_P = 1 << 0
PTE_PS = 1 << 7

PF_WRITE = 1 << 1

ADDRESS_MASK_52 = 0x000F_FFFF_FFFF_F000


class PageFault(Exception):
    def __init__(self, linear: int, error_code: int) -> None:
        super().__init__(f"page fault at {linear:#x} (error code {error_code:#x})")
        self.linear = linear
        self.error_code = error_code


class PagingMode:
    """A snapshot of the registers that decide how linear addresses translate."""

    def __init__(self, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.enabled = bool(cr0 & CR0_PG)
        self.cr3 = cr3
        self.cr4 = cr4
        self.long = bool(efer & EFER_LMA)


def translate(memory: GuestMemory, mode: PagingMode, linear: int, write: bool = False) -> int:
    """The physical address of `linear` for a supervisor access; raises PageFault."""
    if not mode.enabled:
        return linear & 0xFFFFFFFF if not mode.long else linear
    if mode.long:
        return _walk(memory, linear, write, mode.cr3 & ADDRESS_MASK_52,
                     shifts=(39, 30, 21, 12), entry_size=8, large_from=1)
    if mode.cr4 & CR4_PAE:
        linear &= 0xFFFFFFFF
        pdpte = memory.read_u64((mode.cr3 & 0xFFFFFFE0) + 8 * (linear >> 30))
        if not pdpte & PTE_P:
            raise PageFault(linear, PF_WRITE * write)
        return _walk(memory, linear, write, pdpte & ADDRESS_MASK_52,
                     shifts=(21, 12), entry_size=8, large_from=0)
    linear &= 0xFFFFFFFF
    large_from = 0 if mode.cr4 & CR4_PSE else 99
    return _walk(memory, linear, write, mode.cr3 & 0xFFFFF000,
                 shifts=(22, 12), entry_size=4, large_from=large_from)


def _walk(memory: GuestMemory, linear: int, write: bool, table: int, shifts: tuple[int, ...],
          entry_size: int, large_from: int) -> int:
    index_mask = 511 if entry_size == 8 else 1023  # entries per 4 KiB table
    read_entry = memory.read_u64 if entry_size == 8 else memory.read_u32
    for level, shift in enumerate(shifts):
        entry = read_entry(table + entry_size * ((linear >> shift) & index_mask))
        if not entry & PTE_P:
            raise PageFault(linear, PF_WRITE * write)
        last = shift == 12
        if not last and level >= large_from and entry & PTE_PS:
            if entry_size == 4:  # a 4 MiB page: bits 13..20 extend the address past 4 GiB
                frame = (entry & 0xFFC00000) | ((entry >> 13) & 0xFF) << 32
            else:
                frame = entry & ADDRESS_MASK_52 & ~((1 << shift) - 1)
            return frame | (linear & ((1 << shift) - 1))
        table = entry & (ADDRESS_MASK_52 if entry_size == 8 else 0xFFFFF000)
        if last:
            return table | (linear & 0xFFF)
    raise AssertionError("unreachable")


def read_linear(memory: GuestMemory, mode: PagingMode, linear: int, length: int) -> bytes:
    """Read `length` bytes at a linear address, page by page; raises PageFault."""
    out = bytearray()
    while length:
        chunk = min(length, 0x1000 - (linear & 0xFFF))
        out += memory.read(translate(memory, mode, linear), chunk)
        linear += chunk
        length -= chunk
    return bytes(out)


def write_linear(memory: GuestMemory, mode: PagingMode, linear: int, data: bytes) -> None:
    """Write at a linear address; every page is translated before anything is written."""
    pieces = []
    offset = 0
    while offset < len(data):
        chunk = min(len(data) - offset, 0x1000 - ((linear + offset) & 0xFFF))
        pieces.append((translate(memory, mode, linear + offset, write=True), data[offset:offset + chunk]))
        offset += chunk
    for physical, piece in pieces:
        memory.write(physical, piece)
