"""Parse and load an ELF vmlinux: PT_LOAD segments at their physical addresses.

This is how an uncompressed kernel is booted (Firecracker, QEMU's PVH path):
each loadable segment goes to `p_paddr`, the bytes past `p_filesz` up to
`p_memsz` are zeroed, and the CPU enters `startup_64` at the ELF entry. The
kernel links its entry (`phys_startup_64`) as a physical address; an entry
given as a virtual address is translated through the segment that holds it.
The decompressed payload of a bzImage is such an ELF with the relocation
table appended; the appended bytes are simply never loaded. It arrives in
chunks (boot/decompress.py), and each chunk's bytes go straight to their
segments, so the loader reads the headers from the stream's first bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import NamedTuple

from boot.bzimage import NotALinuxKernel
from boot.elf import ELFCLASS64, EM_X86_64, ElfError, Segment, read_executable
from vmm.errors import PyvmmError
from vmm.layout import MiB
from vmm.memory import GuestMemory

# Where a streamed vmlinux's ELF and program headers must lie (a kernel's are in its
# first 400 bytes).
STREAM_HEADER_BYTES = 64 * 1024


class Vmlinux(NamedTuple):
    entry: int  # physical address of startup_64
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        return min(s.physical_address for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def parse_vmlinux(data: bytes | memoryview, source: str = "kernel", file_size: int | None = None) -> Vmlinux:
    """Validate an x86-64 ELF executable (boot/elf.py); raise NotALinuxKernel on anything wrong.

    `data` may be the file's first bytes only, with `file_size` its whole length."""
    try:
        executable = read_executable(data, ELFCLASS64, EM_X86_64, "x86-64", file_size)
    except ElfError as err:
        raise NotALinuxKernel(source, f"ELF: {err}") from None
    return Vmlinux(entry=executable.entry, segments=executable.segments)


def parse_streamed_vmlinux(chunks: Iterator[bytes | memoryview], file_size: int,
                           source: str) -> tuple[Vmlinux, Iterator[bytes | memoryview]]:
    """The headers of a vmlinux that arrives in chunks, read from its first bytes, and
    the chunks again from the start, for `load_vmlinux`."""
    taken: list[bytes | memoryview] = []
    head = bytearray()
    for chunk in chunks:
        head += chunk[: STREAM_HEADER_BYTES - len(head)]
        if len(head) == STREAM_HEADER_BYTES:
            taken.append(chunk)
            break
        taken.append(bytes(chunk))  # kept past the next chunk, which may reuse its buffer
    return parse_vmlinux(head, source, file_size), chain(taken, chunks)


def load_vmlinux(memory: GuestMemory, vmlinux: Vmlinux, chunks: Iterable[bytes | memoryview]) -> None:
    """Copy every PT_LOAD segment to guest RAM at its physical address from the file's
    bytes, which arrive in `chunks` in order; zero the rest of each segment."""
    for seg in vmlinux.segments:
        if not memory.contains(seg.physical_address, seg.memory_size):
            raise PyvmmError(
                f"the kernel needs guest memory up to {vmlinux.end / MiB:.0f} MiB "
                f"(a segment at {seg.physical_address:#x}), but the guest has "
                f"{memory.size / MiB:.0f} MiB; give it more --memory"
            )
    chunk_start = 0
    for chunk in chunks:
        chunk_end = chunk_start + len(chunk)
        view = memoryview(chunk)
        for seg in vmlinux.segments:
            start = max(chunk_start, seg.file_offset)
            end = min(chunk_end, seg.file_offset + seg.file_size)
            if start < end:
                memory.write(seg.physical_address + start - seg.file_offset,
                             view[start - chunk_start : end - chunk_start])
        chunk_start = chunk_end
    for seg in vmlinux.segments:
        if seg.memory_size > seg.file_size:
            memory.fill(seg.physical_address + seg.file_size, seg.memory_size - seg.file_size)
