"""Booting through firmware: where the image goes, where the vCPU starts, what fw_cfg holds."""

import struct

import pytest

from boot.firmware import (
    BootFailureWatch,
    add_boot_files,
    add_machine_facts,
    bootorder_file,
    e820_file,
    map_bios,
    read_bios,
    reset_vector_state,
)
from devices.fw_cfg import KEY_FILE_DIR, KEY_NB_CPUS, KEY_RAM_SIZE, FwCfg
from devices.virtio import mmio
from vmm.errors import PyvmmError
from vmm.layout import GiB, MiB
from vmm.memory import GuestMemory


@pytest.fixture
def memory():
    mem = GuestMemory(64 * MiB)
    yield mem
    mem.close()


def read_item(fw_cfg: FwCfg, key: int, length: int) -> bytes:
    fw_cfg.write(0, 2, key)
    return bytes(fw_cfg.read(1, 1) for _ in range(length))


def file_names(fw_cfg: FwCfg) -> list[str]:
    count = struct.unpack(">I", read_item(fw_cfg, KEY_FILE_DIR, 4))[0]
    raw = read_item(fw_cfg, KEY_FILE_DIR, 4 + 64 * count)[4:]
    return [raw[i + 8 : i + 64].rstrip(b"\0").decode() for i in range(0, len(raw), 64)]


def test_bios_sits_below_4g_and_its_top_in_low_ram(memory):
    image = bytes(range(256)) * 512  # 128 KiB
    map_bios(memory, image)
    assert memory.read(4 * GiB - len(image), len(image)) == image
    assert memory.read(0xE0000, len(image)) == image


def test_a_256k_bios_puts_only_its_last_128k_below_1m(memory):
    image = b"\x01" * (128 << 10) + b"\x02" * (128 << 10)
    map_bios(memory, image)
    assert memory.read(0xE0000, 128 << 10) == b"\x02" * (128 << 10)
    assert memory.read(4 * GiB - len(image), 4) == b"\x01" * 4


def test_vcpu_starts_at_the_reset_vector():
    state = reset_vector_state()
    cs = state.segments["cs"]
    assert (cs.selector, cs.base, state.reg("rip")) == (0xF000, 0xFFFF_0000, 0xFFF0)
    assert cs.base + state.reg("rip") == 0xFFFF_FFF0
    assert state.cr0 & 1 == 0  # real mode


@pytest.mark.parametrize("size", [0, 100, 512 << 10])
def test_images_that_are_not_firmware_are_refused(tmp_path, size):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(bytes(size))
    with pytest.raises(PyvmmError, match="multiple of 4K"):
        read_bios(bios)


def test_missing_bios_names_the_option(tmp_path):
    with pytest.raises(PyvmmError, match="--bios .*: no such file"):
        read_bios(tmp_path / "nope.bin")


def test_machine_facts(memory):
    fw_cfg = FwCfg(memory)
    add_machine_facts(fw_cfg, 5 * GiB, cpus=3)
    assert struct.unpack("<Q", read_item(fw_cfg, KEY_RAM_SIZE, 8))[0] == 5 * GiB
    assert struct.unpack("<H", read_item(fw_cfg, KEY_NB_CPUS, 2))[0] == 3
    assert file_names(fw_cfg) == ["etc/e820"]


def test_e820_file_lists_ram_around_the_mmio_hole():
    entries = list(struct.iter_unpack("<QQI", e820_file(4 * GiB)))
    assert entries == [(0, 3 * GiB, 1), (4 * GiB, 1 * GiB, 1)]


def test_boot_files_and_bootorder(memory):
    fw_cfg = FwCfg(memory)
    windows = [mmio.window(0), mmio.window(1)]
    add_boot_files(fw_cfg, 1, [mmio.acpi_description(n, w) for n, w in enumerate(windows)],
                   boot_windows=[0xC000_1000, 0xC000_0000])
    assert file_names(fw_cfg) == ["etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader",
                                  "etc/boot-fail-wait", "bootorder"]
    assert bootorder_file([0xC000_1000]) == b"/virtio-mmio@00000000c0001000/disk@0,0\n"


def test_boot_failure_watch_sees_the_message_split_across_writes():
    out = []
    watch = BootFailureWatch(out.append)
    watch(b"Boot failed: not a bootable disk\r\n\r\nNo boot")
    assert not watch.seen
    watch(b"able device.  Retrying in 0 seconds.")
    assert watch.seen
    assert b"".join(out).count(b"No bootable device.") == 1  # everything passed through
