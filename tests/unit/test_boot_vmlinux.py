"""ELF vmlinux parsing and loading at physical addresses."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boot.bzimage import NotALinuxKernel
from boot.elf import is_elf
from boot.vmlinux import STREAM_HEADER_BYTES, load_vmlinux, parse_streamed_vmlinux, parse_vmlinux
from tests.assets import make_vmlinux
from tests.fuzzing import fuzz_settings
from vmm.errors import PyvmmError
from vmm.memory import GuestMemory

MiB = 1 << 20
KERNEL_VIRTUAL_OFFSET = 0xFFFF_FFFF_8000_0000


@pytest.fixture
def memory():
    mem = GuestMemory(64 * MiB)
    yield mem
    mem.close()


def test_loads_segments_at_physical_addresses_and_zeroes_bss(memory):
    text, data = b"\xfa\xf4" * 100, b"DATA" * 10
    elf = make_vmlinux([(0x100_0000, text, len(text)), (0x120_0000, data, len(data) + 0x1000)],
                       entry=0x100_0000, virtual_offset=KERNEL_VIRTUAL_OFFSET)
    memory.fill(0x120_0000, 0x2000, 0xCC)  # stale bytes where the bss goes
    vmlinux = parse_vmlinux(elf)
    assert vmlinux.entry == 0x100_0000
    assert (vmlinux.start, vmlinux.end) == (0x100_0000, 0x120_0000 + len(data) + 0x1000)
    load_vmlinux(memory, vmlinux, [elf])
    assert memory.read(0x100_0000, len(text)) == text
    assert memory.read(0x120_0000, len(data)) == data
    assert memory.read(0x120_0000 + len(data), 0x1000) == bytes(0x1000)
    assert memory.read_u8(0x120_0000 + len(data) + 0x1000) == 0xCC  # nothing past memsz


STREAMED = make_vmlinux([(0x100_0000, bytes(range(256)) * 300, 0x20_0000), (0x130_0000, b"DATA" * 5000, 0x8000)],
                        entry=0x100_0000, virtual_offset=KERNEL_VIRTUAL_OFFSET) + b"relocations" * 10


def chunked(data, sizes):
    """`data` cut into pieces of the given sizes in turn (the last piece takes the rest)."""
    pieces, position = [], 0
    for size in sizes:
        pieces.append(data[position : position + size])
        position += size
    return [piece for piece in pieces if piece] + [data[position:]]


def through_one_buffer(pieces):
    """The pieces as a decoder that reuses its buffer hands them out (boot/lz4_legacy.py):
    each overwrites the one before."""
    buffer = bytearray(max(len(piece) for piece in pieces))
    for piece in pieces:
        buffer[: len(piece)] = piece
        yield memoryview(buffer)[: len(piece)]


@fuzz_settings(100)
@given(st.lists(st.integers(1, 40_000), max_size=12))
def test_a_vmlinux_in_chunks_loads_as_the_whole_file_does(sizes):
    """However a decompressor cuts the file (headers split, segments split, a chunk
    holding the end of one segment and the start of the next), and though it reuses one
    buffer for every chunk, guest RAM ends the same."""
    whole, streamed = GuestMemory(32 * MiB), GuestMemory(32 * MiB)
    try:
        load_vmlinux(whole, parse_vmlinux(STREAMED), [STREAMED])
        chunks = through_one_buffer(chunked(STREAMED, sizes))
        vmlinux, chunks = parse_streamed_vmlinux(chunks, len(STREAMED), "test")
        assert vmlinux == parse_vmlinux(STREAMED)
        load_vmlinux(streamed, vmlinux, chunks)
        assert streamed.read(0x100_0000, 0x40_0000) == whole.read(0x100_0000, 0x40_0000)
        assert whole.read(0x130_0000, 4) == b"DATA"
    finally:
        whole.close()
        streamed.close()


def test_streamed_headers_must_lie_in_the_first_bytes():
    elf = bytearray(STREAMED)
    struct.pack_into("<Q", elf, 32, STREAM_HEADER_BYTES)  # e_phoff: the table moved out of reach
    with pytest.raises(NotALinuxKernel, match=f"past the file's first {STREAM_HEADER_BYTES} bytes"):
        parse_streamed_vmlinux(iter([bytes(elf)]), len(elf) + STREAM_HEADER_BYTES, "test")


def test_a_streamed_segment_past_the_announced_size_is_refused():
    with pytest.raises(NotALinuxKernel, match="beyond the end of the file"):
        parse_streamed_vmlinux(iter([STREAMED[:1000]]), 1000, "test")


def test_virtual_entry_is_translated_to_physical():
    elf = make_vmlinux([(0x100_0000, b"\x90" * 0x100, 0x100)], entry=KERNEL_VIRTUAL_OFFSET + 0x100_0010,
                       virtual_offset=KERNEL_VIRTUAL_OFFSET)
    assert parse_vmlinux(elf).entry == 0x100_0010


def test_trailing_bytes_are_ignored():
    # The bzImage payload is vmlinux with its relocation table appended.
    elf = make_vmlinux([(0x100_0000, b"\x90" * 16, 16)], entry=0x100_0000, extra=b"relocs" * 100)
    assert parse_vmlinux(elf).segments[0].file_size == 16


def test_kernel_beyond_guest_memory_is_a_clear_error(memory):
    elf = make_vmlinux([(0x300_0000, b"\x90" * 16, 0x200_0000)], entry=0x300_0000)
    with pytest.raises(PyvmmError, match="more --memory"):
        load_vmlinux(memory, parse_vmlinux(elf), [elf])


def elf_with(offset: int, fmt: str, value) -> bytes:
    data = bytearray(make_vmlinux([(0x100_0000, b"\x90" * 16, 16)], entry=0x100_0000))
    struct.pack_into("<" + fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x7fELF", "no ELF header"),
        (elf_with(4, "B", 1), "64-bit little-endian"),
        (elf_with(18, "H", 3), "not x86-64"),
        (elf_with(16, "H", 3), "not an executable"),
        (elf_with(54, "H", 32), "program header table"),
        (elf_with(56, "H", 0), "program header table"),
        (elf_with(32, "Q", 1 << 40), "beyond the end"),
        (elf_with(64 + 8, "Q", 1 << 30), "segment 0 lies beyond"),
        (elf_with(64 + 32, "Q", 1 << 30), "more file bytes"),
        (elf_with(64, "I", 4), "no loadable segments"),
        (elf_with(24, "Q", 0x500), "entry point"),
        (elf_with(64 + 24, "Q", 1 << 60), "impossible physical address"),
    ],
)
def test_rejects_bad_elf(data, message):
    with pytest.raises(NotALinuxKernel, match=message):
        parse_vmlinux(data, "vmlinux")


def test_is_elf():
    assert is_elf(b"\x7fELF\x02")
    assert not is_elf(b"MZ\x90\x00")


VALID = make_vmlinux([(0x100_0000, b"\x90" * 64, 0x1000), (0x110_0000, b"D" * 64, 64)], 0x100_0000)


@fuzz_settings(300)
@given(st.integers(0, len(VALID)), st.lists(st.tuples(st.integers(0, 64 + 2 * 56 - 1), st.integers(0, 255)),
                                            max_size=6))
def test_fuzz_truncated_or_corrupted_elf_never_crashes(length, changes):
    data = bytearray(VALID[:length])
    for offset, value in changes:
        if offset < len(data):
            data[offset] = value
    try:
        vmlinux = parse_vmlinux(bytes(data))
    except PyvmmError:
        return
    for seg in vmlinux.segments:
        assert seg.file_offset + seg.file_size <= len(data)
