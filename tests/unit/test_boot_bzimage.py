"""bzImage header parsing: valid images, every rejection, fuzzed headers, the real Debian kernel."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from boot import bootparam as bp
from boot.bzimage import NotALinuxKernel, parse_bzimage
from tests.assets import linux_assets, make_bzimage  # noqa: F401 - linux_assets is a fixture
from tests.fuzzing import fuzz_settings
from vmm.errors import PyvmmError

PAYLOAD = b"compressed-vmlinux-stand-in" * 10


def patched(image: bytes, offset: int, fmt: str, value) -> bytes:
    data = bytearray(image)
    struct.pack_into("<" + fmt, data, offset, value)
    return bytes(data)


def test_parses_a_valid_image():
    image = make_bzimage(PAYLOAD, setup_sects=4, pref_address=0x100_0000, init_size=0x80_0000)
    parsed = parse_bzimage(image)
    assert parsed.version == 0x020F
    assert parsed.setup_size == 5 * 512
    assert parsed.load_address == 0x100_0000
    assert parsed.init_size == 0x80_0000
    assert parsed.runtime_size == 0x80_0000
    assert parsed.kernel_alignment == 0x20_0000
    assert parsed.relocatable
    assert parsed.initrd_addr_max == 0x7FFF_FFFF
    assert parsed.cmdline_size == 2047
    assert bytes(parsed.payload) == PAYLOAD
    assert bytes(parsed.kernel[: parsed.payload_offset]) == b"\x90" * 0x300
    assert parsed.setup_header == image[0x1F1:0x26C]


def test_setup_sects_zero_means_four():
    parsed = parse_bzimage(make_bzimage(PAYLOAD, setup_sects=0))
    assert parsed.setup_size == 5 * 512


def test_other_setup_sizes_are_honoured():
    parsed = parse_bzimage(make_bzimage(PAYLOAD, setup_sects=27))
    assert parsed.setup_size == 28 * 512
    assert bytes(parsed.payload) == PAYLOAD


def test_runtime_size_covers_a_kernel_larger_than_init_size():
    parsed = parse_bzimage(make_bzimage(b"x" * 0x2000, init_size=0x1000))
    assert parsed.runtime_size == parsed.kernel_size > 0x2000


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda img: img[:0x100], "file too small"),
        (lambda img: patched(img, bp.HEADER, "4s", b"MZ\0\0"), "no 'HdrS'"),
        (lambda img: patched(img, bp.BOOT_FLAG, "H", 0), "0xAA55"),
        (lambda img: patched(img, bp.JUMP, "B", 0x90), "no jump"),
        (lambda img: patched(img, bp.VERSION, "H", 0x0204), "2.04 is too old"),
        (lambda img: patched(img, bp.VERSION, "H", 0x020B), "no 64-bit entry point"),
        (lambda img: patched(img, bp.JUMP + 1, "B", 0x20), "setup header too short"),
        (lambda img: patched(img, bp.SYSSIZE, "I", 0), "kernel is empty"),
        (lambda img: img[: len(img) - 16], "truncated"),
        (lambda img: img[:3000], "truncated"),
        (lambda img: patched(img, bp.LOADFLAGS, "B", 0), "zImage"),
        (lambda img: patched(img, bp.XLOADFLAGS, "H", 0x7E), "not a 64-bit kernel"),
        (lambda img: patched(img, bp.KERNEL_ALIGNMENT, "I", 0x30_0000), "power of two"),
        (lambda img: patched(img, bp.KERNEL_ALIGNMENT, "I", 0), "power of two"),
        (lambda img: patched(img, bp.PREF_ADDRESS, "Q", 0x100_0800), "pref_address"),
        (lambda img: patched(img, bp.PREF_ADDRESS, "Q", 0x110_0000), "not aligned"),
        (lambda img: patched(img, bp.PREF_ADDRESS, "Q", 0), "pref_address"),
        (lambda img: patched(img, bp.PREF_ADDRESS, "Q", 1 << 40), "pref_address"),
        (lambda img: patched(img, bp.INIT_SIZE, "I", 0), "init_size"),
        (lambda img: patched(img, bp.INIT_SIZE, "I", 0xFFFF_FFFF), "init_size"),
        (lambda img: patched(img, bp.CMDLINE_SIZE, "I", 0), "cmdline_size"),
        (lambda img: patched(img, bp.INITRD_ADDR_MAX, "I", 0x1000), "initrd_addr_max"),
        (lambda img: patched(img, bp.PAYLOAD_LENGTH, "I", 0x10_0000), "payload"),
        (lambda img: patched(img, bp.PAYLOAD_OFFSET, "I", 0xFFFF_FFF0), "payload"),
    ],
)
def test_rejects_bad_images_with_one_line(mutate, message):
    with pytest.raises(NotALinuxKernel) as caught:
        parse_bzimage(mutate(make_bzimage(PAYLOAD)), "vmlinuz-test")
    text = str(caught.value)
    assert text.startswith("not a Linux kernel: vmlinuz-test: ")
    assert message in text
    assert "\n" not in text


def test_non_relocatable_kernel_need_not_align_pref_address():
    image = make_bzimage(PAYLOAD, relocatable=False, pref_address=0x110_0000)
    assert parse_bzimage(image).load_address == 0x110_0000


def test_not_a_kernel_is_a_pyvmm_error():
    with pytest.raises(PyvmmError):
        parse_bzimage(b"#!/bin/sh\necho hello\n" * 100)


VALID = make_bzimage(PAYLOAD)


@fuzz_settings(300)
@given(st.integers(min_value=0, max_value=len(VALID)))
def test_fuzz_truncation_never_crashes(length):
    try:
        parsed = parse_bzimage(VALID[:length])
    except PyvmmError as err:
        assert "\n" not in str(err)
    else:
        # Only a cut in the padding after the kernel can still parse.
        assert length >= parsed.setup_size + parsed.kernel_size


@fuzz_settings(500)
@given(st.lists(st.tuples(st.integers(min_value=0x1F0, max_value=0x26F), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_fuzz_corrupted_header_never_crashes(changes):
    data = bytearray(VALID)
    for offset, value in changes:
        data[offset] = value
    try:
        parsed = parse_bzimage(bytes(data))
    except PyvmmError as err:
        assert str(err).startswith("not a Linux kernel")
        return
    # Whatever got through is self-consistent: the payload lies inside the file.
    assert parsed.setup_size + parsed.kernel_size <= len(data)
    assert len(parsed.payload) == parsed.payload_length
    assert parsed.init_size > 0 and parsed.kernel_alignment & (parsed.kernel_alignment - 1) == 0


@fuzz_settings(200)
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes_never_crash(data):
    with pytest.raises(PyvmmError):
        parse_bzimage(data)


def test_real_debian_kernel_header(linux_assets):  # noqa: F811
    image = parse_bzimage(linux_assets.kernel.read_bytes(), linux_assets.kernel.name)
    assert image.version >= 0x020F
    assert image.relocatable
    assert image.load_address == 0x100_0000
    assert image.cmdline_size == 2047
    assert image.initrd_addr_max == 0x7FFF_FFFF
    assert image.init_size > image.kernel_size
    assert bytes(image.payload[:4]) == struct.pack("<I", 0x184C2102)  # LZ4, legacy frame
