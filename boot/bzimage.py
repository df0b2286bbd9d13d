"""Parse a bzImage: the setup header of the x86 boot protocol and the kernel behind it.

A bzImage is `(setup_sects + 1) * 512` bytes of real-mode setup code (whose
first sector carries the setup header at 0x1f1) followed by the
protected-mode kernel. That protected-mode part begins with the kernel's own
decompressor; its payload (`payload_offset`/`payload_length`) is the compressed
ELF `vmlinux`. Everything here is checked against the file's length: a
truncated or corrupt file raises `NotALinuxKernel`, one line, never IndexError.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from boot import bootparam as bp
from vmm.errors import PyvmmError
from vmm.layout import HIGH_MEMORY_START

MIN_VERSION = 0x0206  # cmdline_size appears in 2.06
MIN_VERSION_64BIT = 0x020C  # xloadflags (and so XLF_KERNEL_64) appears in 2.12
MAX_KERNEL_ALIGNMENT = 1 << 30
MAX_INIT_SIZE = 1 << 30  # a kernel that wants more than 1 GiB to boot is a corrupt header


class NotALinuxKernel(PyvmmError):
    """The file is not a kernel pyvmm can boot; the message says why in one line."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"not a Linux kernel: {source}: {reason}")


def _version_text(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


class BzImage(NamedTuple):
    """What the loader needs from a bzImage, already validated."""

    data: bytes  # the whole file
    version: int
    setup_size: int  # bytes of real-mode code before the protected-mode kernel
    kernel_size: int  # bytes of protected-mode kernel (from syssize)
    header_end: int  # end of the setup header (file offset)
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    initrd_addr_max: int
    cmdline_size: int
    pref_address: int
    init_size: int
    payload_offset: int
    payload_length: int

    @property
    def setup_header(self) -> bytes:
        """The setup header exactly as it is in the file, to copy into boot_params at 0x1f1."""
        return self.data[bp.SETUP_HEADER : self.header_end]

    @property
    def kernel(self) -> memoryview:
        """The protected-mode kernel: what is loaded at `load_address`."""
        return memoryview(self.data)[self.setup_size : self.setup_size + self.kernel_size]

    @property
    def payload(self) -> memoryview:
        """The compressed vmlinux inside the protected-mode kernel."""
        return self.kernel[self.payload_offset : self.payload_offset + self.payload_length]

    @property
    def load_address(self) -> int:
        """Where the protected-mode kernel goes: the kernel's preferred address.

        A relocatable kernel could go anywhere aligned, but at pref_address its
        decompressor decompresses in place and moves nothing; a non-relocatable
        one runs at pref_address whatever we do.
        """
        return self.pref_address

    @property
    def runtime_size(self) -> int:
        """Bytes from load_address the kernel needs before it reads the memory map."""
        return max(self.init_size, self.kernel_size)


def parse_bzimage(data: bytes, source: str = "kernel") -> BzImage:
    """Validate a bzImage's setup header; raise NotALinuxKernel on anything wrong."""

    def fail(reason: str) -> NotALinuxKernel:
        return NotALinuxKernel(source, reason)

    def field(offset: int, fmt: str) -> int:
        return struct.unpack_from("<" + fmt, data, offset)[0]

    if len(data) < bp.VERSION + 2:
        raise fail(f"file too small for a boot header ({len(data)} bytes)")
    if data[bp.HEADER : bp.HEADER + 4] != bp.HEADER_MAGIC:
        raise fail("no 'HdrS' boot-protocol magic at offset 0x202")
    if field(bp.BOOT_FLAG, "H") != bp.BOOT_FLAG_MAGIC:
        raise fail("boot sector does not end in 0xAA55")
    if data[bp.JUMP] != bp.SHORT_JUMP_OPCODE:
        raise fail("no jump instruction at offset 0x200")
    version = field(bp.VERSION, "H")
    if version < MIN_VERSION:
        raise fail(f"boot protocol {_version_text(version)} is too old (pyvmm needs 2.06 or later)")
    if version < MIN_VERSION_64BIT:
        raise fail(f"boot protocol {_version_text(version)} has no 64-bit entry point (needs 2.12)")

    # The jump's signed offset byte, counted from 0x202, is where the header ends.
    header_end = bp.HEADER + data[bp.JUMP + 1]
    if header_end < bp.SETUP_HEADER_END_2_10:
        raise fail(f"setup header too short ({header_end - bp.SETUP_HEADER} bytes)")
    setup_sects = data[bp.SETUP_SECTS] or 4  # 0 means 4, for historical reasons
    setup_size = (setup_sects + 1) * 512
    if header_end > setup_size or len(data) < header_end:
        raise fail(f"truncated setup header (file is {len(data)} bytes)")

    kernel_size = field(bp.SYSSIZE, "I") * 16
    if kernel_size == 0:
        raise fail("the header says the kernel is empty (syssize 0)")
    if len(data) < setup_size + kernel_size:
        raise fail(f"truncated: the header promises {setup_size + kernel_size} bytes, "
                   f"the file has {len(data)}")

    loadflags = data[bp.LOADFLAGS]
    if not loadflags & bp.LOADED_HIGH:
        raise fail("a zImage (loaded low); only bzImage kernels are supported")
    xloadflags = field(bp.XLOADFLAGS, "H")
    if not xloadflags & bp.XLF_KERNEL_64:
        raise fail("not a 64-bit kernel (XLF_KERNEL_64 is clear in xloadflags)")

    kernel_alignment = field(bp.KERNEL_ALIGNMENT, "I")
    relocatable = bool(data[bp.RELOCATABLE_KERNEL])
    if not 0 < kernel_alignment <= MAX_KERNEL_ALIGNMENT or kernel_alignment & (kernel_alignment - 1):
        raise fail(f"corrupt header: kernel_alignment {kernel_alignment:#x} is not a power of two")

    pref_address = field(bp.PREF_ADDRESS, "Q")
    if pref_address % 4096 or not HIGH_MEMORY_START <= pref_address < 1 << 32:
        raise fail(f"corrupt header: pref_address {pref_address:#x}")
    if relocatable and pref_address % kernel_alignment:
        raise fail(f"corrupt header: pref_address {pref_address:#x} is not aligned to "
                   f"kernel_alignment {kernel_alignment:#x}")

    init_size = field(bp.INIT_SIZE, "I")
    if not 0 < init_size <= MAX_INIT_SIZE:
        raise fail(f"corrupt header: init_size {init_size:#x}")

    cmdline_size = field(bp.CMDLINE_SIZE, "I")
    if cmdline_size == 0:
        raise fail("corrupt header: cmdline_size is 0")
    initrd_addr_max = field(bp.INITRD_ADDR_MAX, "I")
    if initrd_addr_max < 1 << 20:
        raise fail(f"corrupt header: initrd_addr_max {initrd_addr_max:#x}")

    payload_offset = field(bp.PAYLOAD_OFFSET, "I")
    payload_length = field(bp.PAYLOAD_LENGTH, "I")
    if payload_offset + payload_length > kernel_size:
        raise fail(f"corrupt header: payload {payload_offset:#x}+{payload_length:#x} lies "
                   f"beyond the {kernel_size}-byte kernel")

    return BzImage(
        data=data,
        version=version,
        setup_size=setup_size,
        kernel_size=kernel_size,
        header_end=header_end,
        loadflags=loadflags,
        xloadflags=xloadflags,
        relocatable=relocatable,
        kernel_alignment=kernel_alignment,
        initrd_addr_max=initrd_addr_max,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
        payload_offset=payload_offset,
        payload_length=payload_length,
    )
