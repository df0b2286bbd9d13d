"""boot_params layout (pinned to bootparam.h) and what the loader writes into it."""

import struct

from boot import bootparam as bp
from boot.e820 import E820_RAM, E820_RESERVED, E820Entry
from boot.zeropage import BootParamsInput, build_boot_params
from tests.assets import make_bzimage


def test_layout_matches_the_kernel_header():
    # Offsets from arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/zero-page.rst.
    assert bp.BOOT_PARAMS_SIZE == 4096
    assert bp.ACPI_RSDP_ADDR == 0x070
    assert (bp.EXT_RAMDISK_IMAGE, bp.EXT_RAMDISK_SIZE, bp.EXT_CMD_LINE_PTR) == (0x0C0, 0x0C4, 0x0C8)
    assert (bp.E820_ENTRIES, bp.SENTINEL, bp.SETUP_HEADER) == (0x1E8, 0x1EF, 0x1F1)
    assert (bp.E820_TABLE, bp.E820_MAX_ENTRIES, bp.E820_ENTRY_SIZE) == (0x2D0, 128, 20)
    assert bp.E820_TABLE + bp.E820_MAX_ENTRIES * bp.E820_ENTRY_SIZE == 0xCD0  # then _pad8, eddbuf
    header = {
        "SETUP_SECTS": 0x1F1, "SYSSIZE": 0x1F4, "VID_MODE": 0x1FA, "BOOT_FLAG": 0x1FE,
        "JUMP": 0x200, "HEADER": 0x202, "VERSION": 0x206, "TYPE_OF_LOADER": 0x210,
        "LOADFLAGS": 0x211, "CODE32_START": 0x214, "RAMDISK_IMAGE": 0x218, "RAMDISK_SIZE": 0x21C,
        "HEAP_END_PTR": 0x224, "CMD_LINE_PTR": 0x228, "INITRD_ADDR_MAX": 0x22C,
        "KERNEL_ALIGNMENT": 0x230, "RELOCATABLE_KERNEL": 0x234, "MIN_ALIGNMENT": 0x235,
        "XLOADFLAGS": 0x236, "CMDLINE_SIZE": 0x238, "PAYLOAD_OFFSET": 0x248,
        "PAYLOAD_LENGTH": 0x24C, "PREF_ADDRESS": 0x258, "INIT_SIZE": 0x260,
    }
    for name, offset in header.items():
        assert getattr(bp, name) == offset, name


E820 = [E820Entry(0, 0x9FC00, E820_RAM), E820Entry(0x9FC00, 0x60400, E820_RESERVED),
        E820Entry(0x100000, 0x7F00000, E820_RAM)]
HEADER = make_bzimage(b"payload")[0x1F1:0x26C]


def build(**overrides):
    params = dict(setup_header=HEADER, e820=E820, cmdline_address=0x20000)
    params.update(overrides)
    return build_boot_params(BootParamsInput(**params))


def u(page, offset, fmt):
    return struct.unpack_from("<" + fmt, page, offset)[0]


def test_setup_header_is_copied_and_loader_fields_set():
    page = build(rsdp_address=0xE0000, code32_start=0x100_0000)
    assert len(page) == 4096
    assert page[0x202:0x206] == b"HdrS"
    assert u(page, bp.VERSION, "H") == 0x020F
    assert u(page, bp.KERNEL_ALIGNMENT, "I") == 0x20_0000  # untouched header fields survive
    assert page[bp.TYPE_OF_LOADER] == 0xFF
    assert page[bp.LOADFLAGS] & bp.CAN_USE_HEAP and page[bp.LOADFLAGS] & bp.LOADED_HIGH
    assert u(page, bp.HEAP_END_PTR, "H") == 0xFE00
    assert u(page, bp.VID_MODE, "H") == 0xFFFF
    assert u(page, bp.CODE32_START, "I") == 0x100_0000
    assert u(page, bp.ACPI_RSDP_ADDR, "Q") == 0xE0000
    assert u(page, bp.CMD_LINE_PTR, "I") == 0x20000 and u(page, bp.EXT_CMD_LINE_PTR, "I") == 0
    assert page[bp.SENTINEL] == 0  # the kernel would otherwise distrust the page
    assert page[: bp.ACPI_RSDP_ADDR] == bytes(bp.ACPI_RSDP_ADDR)  # screen_info etc. zero


def test_e820_table():
    page = build()
    assert page[bp.E820_ENTRIES] == 3
    entries = [struct.unpack_from("<QQI", page, bp.E820_TABLE + i * 20) for i in range(3)]
    assert entries == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 0x7F00000, 1)]
    assert page[bp.E820_TABLE + 60 : bp.E820_TABLE + 80] == bytes(20)


def test_initrd_fields_low_and_extended():
    page = build(initrd_address=0x7F00_0000, initrd_size=0x20_0000)
    assert (u(page, bp.RAMDISK_IMAGE, "I"), u(page, bp.RAMDISK_SIZE, "I")) == (0x7F00_0000, 0x20_0000)
    assert (u(page, bp.EXT_RAMDISK_IMAGE, "I"), u(page, bp.EXT_RAMDISK_SIZE, "I")) == (0, 0)
    page = build(initrd_address=0x1_2345_6000, initrd_size=0x1_0000_1000, cmdline_address=0x2_0000_0000)
    assert (u(page, bp.RAMDISK_IMAGE, "I"), u(page, bp.EXT_RAMDISK_IMAGE, "I")) == (0x2345_6000, 1)
    assert (u(page, bp.RAMDISK_SIZE, "I"), u(page, bp.EXT_RAMDISK_SIZE, "I")) == (0x1000, 1)
    assert (u(page, bp.CMD_LINE_PTR, "I"), u(page, bp.EXT_CMD_LINE_PTR, "I")) == (0, 2)


def test_no_code32_start_keeps_the_header_value():
    assert u(build(), bp.CODE32_START, "I") == 0x100000
