"""load_linux(): both ways into a bzImage, an ELF vmlinux, initrd placement, command line, errors."""

import struct

import pytest

from boot import bootparam as bp
from boot.linux import load_linux
from tests.assets import compress_like_kernel, linux_assets, make_bzimage, make_vmlinux  # noqa: F401
from vmm.errors import PyvmmError
from vmm.layout import CMDLINE_ADDRESS, ZERO_PAGE_ADDRESS
from vmm.memory import GuestMemory

MiB = 1 << 20
TEXT = b"\xfa\xf4" * 2048  # cli; hlt
VMLINUX = make_vmlinux([(0x100_0000, TEXT, 0x20_0000)], entry=0x100_0000,
                       virtual_offset=0xFFFF_FFFF_8000_0000, extra=b"relocs")
DECOMPRESSOR = b"\xeb\xfe" * 0x180  # stands for the in-guest decompressor's code


@pytest.fixture
def memory():
    mem = GuestMemory(64 * MiB)
    yield mem
    mem.close()


@pytest.fixture
def files(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def zero_page(memory):
    return memory.read(ZERO_PAGE_ADDRESS, 4096)


def u32(page, offset):
    return struct.unpack_from("<I", page, offset)[0]


@pytest.mark.parametrize("method", ["gzip", "xz", "lz4", "zstd"])
def test_direct_path_enters_the_decompressed_vmlinux(memory, files, method):
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, method),
                                           decompressor=DECOMPRESSOR, init_size=0x80_0000))
    state = load_linux(memory, kernel, cmdline="console=ttyS0", rsdp_address=0xE0000)
    assert state.regs["rip"] == 0x100_0000
    assert state.regs["rsi"] == ZERO_PAGE_ADDRESS
    assert memory.read(0x100_0000, len(TEXT)) == TEXT
    assert memory.read(0x100_0000 + len(TEXT), 0x1000) == bytes(0x1000)  # bss
    page = zero_page(memory)
    assert page[0x202:0x206] == b"HdrS" and u32(page, bp.INIT_SIZE) == 0x80_0000  # the real header
    assert struct.unpack_from("<Q", page, bp.ACPI_RSDP_ADDR)[0] == 0xE0000
    assert memory.read(CMDLINE_ADDRESS, 14) == b"console=ttyS0\0"
    assert u32(page, bp.CMD_LINE_PTR) == CMDLINE_ADDRESS
    assert page[bp.E820_ENTRIES] == 4


def test_decompressor_path_loads_the_protected_mode_kernel(memory, files):
    image = make_bzimage(compress_like_kernel(VMLINUX, "lz4"), decompressor=DECOMPRESSOR)
    kernel = files("bzImage", image)
    state = load_linux(memory, kernel, cmdline="quiet", direct=False)
    assert state.regs["rip"] == 0x100_0200  # 64-bit entry: load address + 0x200
    assert memory.read(0x100_0000, len(image) - 5 * 512) == image[5 * 512 :]
    assert u32(zero_page(memory), bp.CODE32_START) == 0x100_0000


def test_unsupported_compression_falls_back_to_the_decompressor(memory, files):
    lzo = b"\x89LZO\x00\r\n\x1a\n" + bytes(64) + struct.pack("<I", 1000)
    kernel = files("bzImage", make_bzimage(lzo, decompressor=DECOMPRESSOR))
    assert load_linux(memory, kernel).regs["rip"] == 0x100_0200


def test_plain_elf_vmlinux(memory, files):
    state = load_linux(memory, files("vmlinux", VMLINUX), cmdline="x" * 2047)
    assert state.regs["rip"] == 0x100_0000
    page = zero_page(memory)
    assert page[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", page, bp.BOOT_FLAG)[0] == 0xAA55
    assert page[bp.TYPE_OF_LOADER] == 0xFF
    assert u32(page, bp.CMDLINE_SIZE) == 2047
    with pytest.raises(PyvmmError, match="at most 2047"):
        load_linux(memory, files("vmlinux", VMLINUX), cmdline="x" * 2048)


def test_initrd_goes_high_page_aligned_and_clear_of_the_kernel(memory, files):
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip")))
    initrd = bytes(range(256)) * 4001  # not a page multiple
    load_linux(memory, kernel, files("initrd", initrd))
    page = zero_page(memory)
    address, size = u32(page, bp.RAMDISK_IMAGE), u32(page, bp.RAMDISK_SIZE)
    assert size == len(initrd)
    assert address % 4096 == 0
    assert address + size <= 64 * MiB
    assert 64 * MiB - (address + size) < 4096  # as high as possible
    assert memory.read(address, size) == initrd


def test_initrd_respects_initrd_addr_max(memory, files):
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip"),
                                           initrd_addr_max=0x1FF_FFFF))
    load_linux(memory, kernel, files("initrd", b"i" * 10_000))
    address = u32(zero_page(memory), bp.RAMDISK_IMAGE)
    assert address + 10_000 <= 0x200_0000
    assert address >= 0x120_0000  # above the vmlinux (1 MiB text + bss ends at 0x1200000)


def test_initrd_too_big(memory, files):
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip")))
    with pytest.raises(PyvmmError, match=r"initrd \(60 MiB\) does not fit in guest memory \(64 MiB\)"):
        load_linux(memory, kernel, files("initrd", bytes(60 * MiB)))


def test_initrd_must_avoid_the_decompressors_area(memory, files):
    # In-guest decompression needs init_size bytes from the load address: 16-56 MiB here.
    kernel = files("bzImage", make_bzimage(b"\x1f\x8b" + bytes(64), init_size=40 * MiB))
    load_linux(memory, kernel, files("initrd", bytes(6 * MiB)), direct=False)
    assert u32(zero_page(memory), bp.RAMDISK_IMAGE) >= 56 * MiB
    # Too big for the 8 MiB above the kernel: it goes below, between 1 and 16 MiB.
    load_linux(memory, kernel, files("initrd", bytes(10 * MiB)), direct=False)
    address = u32(zero_page(memory), bp.RAMDISK_IMAGE)
    assert 1 * MiB <= address and address + 10 * MiB <= 16 * MiB
    with pytest.raises(PyvmmError, match="does not fit"):
        load_linux(memory, kernel, files("initrd", bytes(16 * MiB)), direct=False)


def test_command_line_longer_than_the_kernel_accepts(memory, files):
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip"), cmdline_size=16))
    load_linux(memory, kernel, cmdline="x" * 16)
    with pytest.raises(PyvmmError, match="17 bytes; this kernel accepts at most 16"):
        load_linux(memory, kernel, cmdline="x" * 17)
    with pytest.raises(PyvmmError, match="NUL"):
        load_linux(memory, kernel, cmdline="a\0b")


def test_kernel_larger_than_memory(files):
    small = GuestMemory(8 * MiB)
    try:
        kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip")))
        with pytest.raises(PyvmmError, match="more --memory"):
            load_linux(small, kernel)
        with pytest.raises(PyvmmError, match="more --memory"):
            load_linux(small, kernel, direct=False)
    finally:
        small.close()


@pytest.mark.parametrize("content", [b"", b"hello", b"MZ" + bytes(5000), b"\x7fELF" + bytes(10)])
def test_not_a_kernel(memory, files, content):
    with pytest.raises(PyvmmError, match="not a Linux kernel"):
        load_linux(memory, files("junk", content))


def test_missing_files(memory, files, tmp_path):
    with pytest.raises(PyvmmError, match="cannot read kernel"):
        load_linux(memory, tmp_path / "nope")
    kernel = files("bzImage", make_bzimage(compress_like_kernel(VMLINUX, "gzip")))
    with pytest.raises(PyvmmError, match="cannot read initrd"):
        load_linux(memory, kernel, tmp_path / "nope")


@pytest.mark.parametrize("direct", [True, False])
def test_real_debian_kernel(linux_assets, direct):  # noqa: F811
    memory = GuestMemory(256 * MiB)
    try:
        state = load_linux(memory, linux_assets.kernel, linux_assets.initrd, "console=ttyS0",
                           rsdp_address=0xE0000, direct=direct)
        page = zero_page(memory)
        assert state.regs["rip"] == (0x100_0000 if direct else 0x100_0200)
        address, size = u32(page, bp.RAMDISK_IMAGE), u32(page, bp.RAMDISK_SIZE)
        assert memory.read(address, 2) == b"\x1f\x8b"  # the gzip'd initramfs
        assert size == linux_assets.initrd.stat().st_size
        assert address >= 0x100_0000 + u32(page, bp.INIT_SIZE)
        if direct:  # startup_64 begins the decompressed image; the ELF header is not loaded
            assert memory.read(0x100_0000, 4) != b"\x7fELF"
    finally:
        memory.close()
