"""Where the initrd goes: as high as the kernel allows, inside RAM, clear of the kernel.

The boot protocol lets the initrd sit anywhere below `initrd_addr_max`;
loaders put it as high as possible so the kernel's own early allocations
(which grow up from the kernel) do not run into it. It must also stay out of
the kernel's runtime area: for a bzImage that is `init_size` bytes from the
load address (the decompressor works there), for a vmlinux its segments.
"""

from __future__ import annotations

from vmm.errors import PyvmmError
from vmm.layout import HIGH_MEMORY_START, MiB
from vmm.memory import GuestMemory

PAGE_SIZE = 4096


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}".removesuffix(".0")


def place_initrd(memory: GuestMemory, size: int, initrd_addr_max: int,
                 kernel_start: int, kernel_end: int) -> int:
    """The page-aligned guest address for an initrd of `size` bytes; PyvmmError if none."""
    low_ram_end = memory.regions[0].end  # RAM below the 32-bit MMIO hole
    top = min(initrd_addr_max + 1, low_ram_end)
    # Highest first: right below `top`, else right below the kernel.
    for ceiling in (top, min(top, kernel_start)):
        address = (ceiling - size) & ~(PAGE_SIZE - 1)
        clear_of_kernel = address + size <= kernel_start or address >= kernel_end
        if address >= HIGH_MEMORY_START and clear_of_kernel and memory.contains(address, size):
            return address
    raise PyvmmError(f"initrd ({_mib(size)} MiB) does not fit in guest memory "
                     f"({_mib(memory.size)} MiB) beside the kernel; give the guest more --memory")
