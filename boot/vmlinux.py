"""Parse and load an ELF vmlinux: PT_LOAD segments at their physical addresses.

This is how an uncompressed kernel is booted (Firecracker, QEMU's PVH path):
each loadable segment goes to `p_paddr`, the bytes past `p_filesz` up to
`p_memsz` are zeroed, and the CPU enters `startup_64` at the ELF entry. The
kernel links its entry (`phys_startup_64`) as a physical address; an entry
given as a virtual address is translated through the segment that holds it.
The decompressed payload of a bzImage is such an ELF with the relocation
table appended; the appended bytes are simply never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from boot.bzimage import NotALinuxKernel
from boot.elf import ELFCLASS64, EM_X86_64, ElfError, Segment, read_executable
from vmm.errors import PyvmmError
from vmm.layout import MiB
from vmm.memory import GuestMemory


@dataclass(frozen=True)
class Vmlinux:
    data: bytes | memoryview
    entry: int  # physical address of startup_64
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        return min(s.physical_address for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def parse_vmlinux(data: bytes | memoryview, source: str = "kernel") -> Vmlinux:
    """Validate an x86-64 ELF executable (boot/elf.py); raise NotALinuxKernel on anything wrong."""
    try:
        executable = read_executable(data, ELFCLASS64, EM_X86_64, "x86-64")
    except ElfError as err:
        raise NotALinuxKernel(source, f"ELF: {err}") from None
    return Vmlinux(data=data, entry=executable.entry, segments=executable.segments)


def load_vmlinux(memory: GuestMemory, vmlinux: Vmlinux) -> None:
    """Copy every PT_LOAD segment to guest RAM at its physical address."""
    for seg in vmlinux.segments:
        if not memory.contains(seg.physical_address, seg.memory_size):
            raise PyvmmError(
                f"the kernel needs guest memory up to {vmlinux.end / MiB:.0f} MiB "
                f"(a segment at {seg.physical_address:#x}), but the guest has "
                f"{memory.size / MiB:.0f} MiB; give it more --memory"
            )
    view = memoryview(vmlinux.data)
    for seg in vmlinux.segments:
        memory.write(seg.physical_address, view[seg.file_offset : seg.file_offset + seg.file_size])
        if seg.memory_size > seg.file_size:
            memory.fill(seg.physical_address + seg.file_size, seg.memory_size - seg.file_size)
