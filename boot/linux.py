"""Load a Linux kernel (bzImage or ELF vmlinux), its initrd and command line; return the entry state.

Two ways into a bzImage:
- direct (default): decompress the payload on the host, load the ELF vmlinux
  at its physical addresses and enter startup_64; the kernel's own
  decompressor, slow on a software CPU, never runs;
- in-guest: load the protected-mode kernel at its preferred address and enter
  its 64-bit entry point (load address + 0x200), which decompresses itself.
The direct path falls back to the in-guest one when the payload's compression
cannot be undone on the host (LZO, or something unknown). Either way the CPU
starts in 64-bit mode with RSI pointing at the zero page.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from boot import bootparam as bp
from boot.bzimage import BzImage, parse_bzimage
from boot.decompress import can_decompress, decompressed_chunks, uncompressed_size
from boot.e820 import build_e820
from boot.elf import is_elf
from boot.initrd import place_initrd
from boot.pagetables import enter_long_mode
from boot.vmlinux import Vmlinux, load_vmlinux, parse_streamed_vmlinux, parse_vmlinux
from boot.zeropage import BootParamsInput, build_boot_params
from vmm.cpu_state import CpuState
from vmm.errors import PyvmmError
from vmm.layout import CMDLINE_ADDRESS, CMDLINE_MAX_SIZE, ZERO_PAGE_ADDRESS, MiB
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

# Physical alignment the kernel is built for by default (CONFIG_PHYSICAL_ALIGN);
# an ELF vmlinux carries no header saying otherwise.
VMLINUX_KERNEL_ALIGNMENT = 0x100_0000


class LoadedKernel(NamedTuple):
    entry: int
    start: int  # the kernel's runtime area, which the initrd must avoid
    end: int
    setup_header: bytes
    initrd_addr_max: int
    cmdline_size: int  # longest command line, without the NUL
    code32_start: int | None
    path: str  # "direct" or "decompressor", for logs and --stats


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise PyvmmError(f"cannot read {what} {path}: {err.strerror}") from None


def synthetic_setup_header() -> bytes:
    """A setup header for an ELF vmlinux, which has none: what the kernel reads from it."""
    header = bytearray(bp.SETUP_HEADER_END_2_10 + 8 - bp.SETUP_HEADER)

    def put(offset: int, fmt: str, value: int | bytes) -> None:
        struct.pack_into("<" + fmt, header, offset - bp.SETUP_HEADER, value)

    put(bp.BOOT_FLAG, "H", bp.BOOT_FLAG_MAGIC)
    put(bp.JUMP, "B", bp.SHORT_JUMP_OPCODE)
    put(bp.JUMP + 1, "B", bp.SETUP_HEADER + len(header) - bp.HEADER)
    put(bp.HEADER, "4s", bp.HEADER_MAGIC)
    put(bp.VERSION, "H", 0x020F)
    put(bp.LOADFLAGS, "B", bp.LOADED_HIGH)
    put(bp.INITRD_ADDR_MAX, "I", bp.DEFAULT_INITRD_ADDR_MAX)
    put(bp.KERNEL_ALIGNMENT, "I", VMLINUX_KERNEL_ALIGNMENT)
    put(bp.XLOADFLAGS, "H", bp.XLF_KERNEL_64)
    put(bp.CMDLINE_SIZE, "I", bp.X86_COMMAND_LINE_SIZE - 1)
    return bytes(header)


def _check_fits(memory: GuestMemory, start: int, end: int) -> None:
    if not memory.contains(start, end - start):
        raise PyvmmError(f"the kernel needs guest memory from {start:#x} to {end:#x} "
                         f"({end / MiB:.0f} MiB), but the guest has {memory.size / MiB:.0f} MiB; "
                         f"give it more --memory")


def _load_elf(memory: GuestMemory, vmlinux: Vmlinux, chunks: Iterable[bytes | memoryview], header: bytes,
              initrd_addr_max: int, cmdline_size: int, path: str) -> LoadedKernel:
    _check_fits(memory, vmlinux.start, vmlinux.end)
    load_vmlinux(memory, vmlinux, chunks)
    return LoadedKernel(vmlinux.entry, vmlinux.start, vmlinux.end, header, initrd_addr_max,
                        cmdline_size, None, path)


def _load_bzimage_in_guest(memory: GuestMemory, image: BzImage) -> LoadedKernel:
    start = image.load_address
    end = start + image.runtime_size
    _check_fits(memory, start, end)
    memory.write(start, image.kernel)
    return LoadedKernel(start + bp.STARTUP_64_OFFSET, start, end, image.setup_header,
                        image.initrd_addr_max, image.cmdline_size, start, "decompressor")


def load_kernel(memory: GuestMemory, data: bytes, source: str, direct: bool = True) -> LoadedKernel:
    """Put the kernel in guest memory, choosing the way in; return where and how to enter it."""
    if is_elf(data):
        header = synthetic_setup_header()
        return _load_elf(memory, parse_vmlinux(data, source), [data], header, bp.DEFAULT_INITRD_ADDR_MAX,
                         bp.X86_COMMAND_LINE_SIZE - 1, "direct")
    image = parse_bzimage(data, source)
    if direct and can_decompress(image.payload):
        # The vmlinux never needs more room than the decompressor would have had.
        chunks = decompressed_chunks(image.payload, limit=min(memory.size, 1 << 32))
        vmlinux, chunks = parse_streamed_vmlinux(chunks, uncompressed_size(image.payload),
                                                 f"{source} (decompressed payload)")
        return _load_elf(memory, vmlinux, chunks, image.setup_header, image.initrd_addr_max,
                         image.cmdline_size, "direct")
    if direct:
        log.info("%s: payload compression not supported on the host; "
                 "the kernel decompresses itself", source)
    return _load_bzimage_in_guest(memory, image)


def write_cmdline(memory: GuestMemory, cmdline: str, limit: int) -> int:
    """Write the NUL-terminated command line; return its address."""
    data = cmdline.encode("utf-8")
    if b"\0" in data:
        raise PyvmmError("the kernel command line cannot contain a NUL character")
    limit = min(limit, CMDLINE_MAX_SIZE - 1)
    if len(data) > limit:
        raise PyvmmError(f"the kernel command line is {len(data)} bytes; "
                         f"this kernel accepts at most {limit}")
    memory.write(CMDLINE_ADDRESS, data + b"\0")
    return CMDLINE_ADDRESS


def load_linux(memory: GuestMemory, kernel_path: str | Path, initrd_path: str | Path | None = None,
               cmdline: str = "", rsdp_address: int = 0, direct: bool = True) -> CpuState:
    """Load kernel, initrd, command line and zero page; return the boot vCPU's state.

    `rsdp_address` is what `boot.acpi.build_acpi_tables()` returned (0: no ACPI).
    `direct=False` makes a bzImage decompress itself in the guest.
    """
    kernel_path = Path(kernel_path)
    kernel = load_kernel(memory, _read(kernel_path, "kernel"), str(kernel_path), direct)
    log.info("kernel %s: %s entry at %#x", kernel_path, kernel.path, kernel.entry)
    cmdline_address = write_cmdline(memory, cmdline, kernel.cmdline_size)

    initrd_address = initrd_size = 0
    if initrd_path is not None:
        initrd = _read(Path(initrd_path), "initrd")
        initrd_size = len(initrd)
        initrd_address = place_initrd(memory, initrd_size, kernel.initrd_addr_max,
                                      kernel.start, kernel.end)
        memory.write(initrd_address, initrd)

    boot_params = build_boot_params(BootParamsInput(
        setup_header=kernel.setup_header,
        e820=build_e820(memory),
        cmdline_address=cmdline_address,
        initrd_address=initrd_address,
        initrd_size=initrd_size,
        rsdp_address=rsdp_address,
        code32_start=kernel.code32_start,
    ))
    memory.write(ZERO_PAGE_ADDRESS, boot_params)
    return enter_long_mode(memory, kernel.entry, ZERO_PAGE_ADDRESS)
