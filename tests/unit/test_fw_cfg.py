"""fw_cfg: the selector and data ports, the file directory, DMA descriptors, a hostile guest's DMA."""

import struct

import pytest

from devices.fw_cfg import (
    DMA_CTL_ERROR,
    DMA_CTL_READ,
    DMA_CTL_SELECT,
    DMA_CTL_SKIP,
    DMA_CTL_WRITE,
    KEY_FILE_DIR,
    KEY_ID,
    KEY_NB_CPUS,
    KEY_SIGNATURE,
    FwCfg,
)
from vmm.memory import GuestMemory

SELECTOR, DATA, DMA_HIGH, DMA_LOW = 0, 1, 4, 8
DESCRIPTOR = 0x1000
BUFFER = 0x2000


@pytest.fixture
def memory():
    mem = GuestMemory(1 << 20)
    yield mem
    mem.close()


def read_item(dev: FwCfg, key: int, length: int) -> bytes:
    dev.write(SELECTOR, 2, key)
    return bytes(dev.read(DATA, 1) for _ in range(length))


def be32_on_the_bus(value: int) -> int:
    """What `outl(cpu_to_be32(value), port)` puts on the bus, as the port write's integer."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def start_dma(dev: FwCfg, descriptor: int) -> None:
    dev.write(DMA_HIGH, 4, be32_on_the_bus(descriptor >> 32))
    dev.write(DMA_LOW, 4, be32_on_the_bus(descriptor & 0xFFFF_FFFF))


def dma(dev: FwCfg, memory: GuestMemory, control: int, length: int, address: int) -> int:
    """Write a descriptor, start it, return the control word the device left."""
    memory.write(DESCRIPTOR, struct.pack(">IIQ", control, length, address))
    start_dma(dev, DESCRIPTOR)
    return struct.unpack(">I", memory.read(DESCRIPTOR, 4))[0]


def test_signature_and_id_announce_dma(memory) -> None:
    dev = FwCfg(memory)
    assert read_item(dev, KEY_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(dev, KEY_ID, 4))[0] == 0b11  # ports and DMA


def test_items_by_key_read_back_and_zeros_past_their_end(memory) -> None:
    dev = FwCfg(memory)
    dev.add_item(KEY_NB_CPUS, struct.pack("<H", 2))
    assert read_item(dev, KEY_NB_CPUS, 4) == b"\x02\x00\x00\x00"


def test_absent_keys_read_zeros(memory) -> None:
    dev = FwCfg(memory)
    assert read_item(dev, 0x0E, 2) == b"\0\0"  # boot menu: absent means "no menu"
    assert read_item(dev, 0x8000, 4) == bytes(4)  # legacy ACPI table count: none


def test_selecting_again_restarts_the_item(memory) -> None:
    dev = FwCfg(memory)
    read_item(dev, KEY_SIGNATURE, 2)
    assert read_item(dev, KEY_SIGNATURE, 4) == b"QEMU"


def test_wide_data_reads_return_consecutive_bytes(memory) -> None:
    dev = FwCfg(memory)
    dev.write(SELECTOR, 2, KEY_SIGNATURE)
    assert dev.read(DATA, 2).to_bytes(2, "little") == b"QE"
    assert dev.read(DATA, 2).to_bytes(2, "little") == b"MU"


def test_write_channel_bit_selects_the_same_item_and_data_writes_are_ignored(memory) -> None:
    dev = FwCfg(memory)
    dev.write(SELECTOR, 2, 0x4000 | KEY_SIGNATURE)
    dev.write(DATA, 1, 0x55)
    assert read_item(dev, KEY_SIGNATURE, 4) == b"QEMU"


def test_file_directory_lists_files_with_their_keys(memory) -> None:
    dev = FwCfg(memory)
    first = dev.add_file("etc/boot-fail-wait", struct.pack("<I", 0))
    second = dev.add_file("bootorder", b"/virtio-mmio@c0000000\n")
    dev.write(SELECTOR, 2, KEY_FILE_DIR)
    count = struct.unpack(">I", read_item(dev, KEY_FILE_DIR, 4))[0]
    assert count == 2
    raw = read_item(dev, KEY_FILE_DIR, 4 + 64 * count)[4:]
    entries = [struct.unpack(">IHH56s", raw[i : i + 64]) for i in range(0, len(raw), 64)]
    assert [(size, key, name.rstrip(b"\0")) for size, key, _, name in entries] == [
        (4, first, b"etc/boot-fail-wait"), (22, second, b"bootorder")]
    assert first == 0x20 and second == 0x21
    assert read_item(dev, second, 22) == b"/virtio-mmio@c0000000\n"


def test_bad_file_names_and_own_keys_are_refused(memory) -> None:
    dev = FwCfg(memory)
    dev.add_file("etc/e820", b"")
    with pytest.raises(ValueError):
        dev.add_file("etc/e820", b"")
    with pytest.raises(ValueError):
        dev.add_file("x" * 56, b"")
    with pytest.raises(ValueError):
        dev.add_item(KEY_FILE_DIR, b"")


def test_dma_address_register_reads_the_signature(memory) -> None:
    dev = FwCfg(memory)
    high = dev.read(DMA_HIGH, 4).to_bytes(4, "little")
    low = dev.read(DMA_LOW, 4).to_bytes(4, "little")
    assert high + low == b"QEMU CFG"


def test_dma_select_and_read_copies_the_item_and_clears_control(memory) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/e820", bytes(range(40)))
    memory.fill(BUFFER, 64, 0xAA)
    status = dma(dev, memory, (key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 48, BUFFER)
    assert status == 0
    assert memory.read(BUFFER, 48) == bytes(range(40)) + bytes(8)  # zeros past the end
    assert memory.read(BUFFER + 48, 1) == b"\xaa"  # nothing beyond the length


def test_dma_skip_then_read_continues_from_the_offset(memory) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/table-loader", bytes(range(100)))
    assert dma(dev, memory, (key << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP, 10, 0) == 0
    assert dma(dev, memory, DMA_CTL_READ, 5, BUFFER) == 0
    assert memory.read(BUFFER, 5) == bytes(range(10, 15))
    # The port interface continues from the same offset.
    assert dev.read(DATA, 1) == 15


def test_dma_select_without_transfer_resets_the_offset(memory) -> None:
    dev = FwCfg(memory)
    read_item(dev, KEY_SIGNATURE, 3)
    assert dma(dev, memory, (KEY_SIGNATURE << 16) | DMA_CTL_SELECT, 0, 0) == 0
    assert dev.read(DATA, 1) == ord("Q")


def test_dma_write_is_refused_and_changes_nothing(memory) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/e820", b"abcd")
    memory.write(BUFFER, b"WXYZ")
    status = dma(dev, memory, (key << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE, 4, BUFFER)
    assert status == DMA_CTL_ERROR
    assert read_item(dev, key, 4) == b"abcd"


@pytest.mark.parametrize("address, length", [
    ((1 << 20) - 4, 8),           # runs off the end of RAM
    (0xFFFF_FFFF_FFFF_FFF0, 16),  # near the top of the 64-bit space
    (0xC000_0000, 4),             # in the MMIO hole
    (0, 0xFFFF_FFFF),             # 4 GiB into 1 MiB of RAM
])
def test_hostile_dma_buffer_is_an_error_status_and_touches_nothing(memory, address, length) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/e820", b"\x11" * 64)
    memory.write(DESCRIPTOR, struct.pack(">IIQ", (key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, length, address))
    before = bytearray(memory.read(0, 1 << 20))
    start_dma(dev, DESCRIPTOR)
    assert struct.unpack(">I", memory.read(DESCRIPTOR, 4))[0] == DMA_CTL_ERROR
    before[DESCRIPTOR : DESCRIPTOR + 4] = struct.pack(">I", DMA_CTL_ERROR)
    assert memory.read(0, 1 << 20) == bytes(before)  # only the status word changed


def test_huge_read_past_the_item_end_is_zero_filled_within_ram(memory) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/e820", b"\x11" * 4)
    memory.fill(BUFFER, 0x80000, 0xAA)
    assert dma(dev, memory, (key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, 0x80000, BUFFER) == 0
    assert memory.read(BUFFER, 8) == b"\x11" * 4 + bytes(4)
    assert memory.read(BUFFER + 8, 0x80000 - 8) == bytes(0x80000 - 8)


@pytest.mark.parametrize("descriptor", [(1 << 20) - 8, 0xFFFF_FFFF_FFFF_FFF8, 0xFEC0_0000])
def test_descriptor_outside_ram_is_ignored(memory, descriptor) -> None:
    dev = FwCfg(memory)
    before = memory.read(0, 1 << 20)
    start_dma(dev, descriptor)
    assert memory.read(0, 1 << 20) == before
    assert read_item(dev, KEY_SIGNATURE, 4) == b"QEMU"  # still working


def test_dma_address_register_starts_over_after_each_transfer(memory) -> None:
    dev = FwCfg(memory)
    memory.write(DESCRIPTOR, struct.pack(">IIQ", (KEY_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ,
                                         4, BUFFER))
    dev.write(DMA_HIGH, 4, be32_on_the_bus(1))  # a stale high half from an earlier transfer...
    dev.write(DMA_LOW, 4, be32_on_the_bus(0))   # ...is consumed by the one it started
    dev.write(DMA_LOW, 4, be32_on_the_bus(DESCRIPTOR))  # the next one starts from a clean high half
    assert memory.read(BUFFER, 4) == b"QEMU"


def test_one_8_byte_write_of_the_whole_address_starts_a_transfer(memory) -> None:
    dev = FwCfg(memory)
    memory.write(DESCRIPTOR, struct.pack(">IIQ", (KEY_SIGNATURE << 16) | DMA_CTL_SELECT | DMA_CTL_READ,
                                         4, BUFFER))
    dev.write(DMA_HIGH, 8, int.from_bytes(DESCRIPTOR.to_bytes(8, "big"), "little"))
    assert memory.read(BUFFER, 4) == b"QEMU"
