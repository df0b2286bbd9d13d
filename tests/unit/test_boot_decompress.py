"""Host-side decompression of bzImage payloads, in every format the kernel build produces."""

import mmap
import os
import struct

import pytest

from boot import lz4_legacy
from boot.bzimage import parse_bzimage
from boot.decompress import (
    CHUNK_SIZE,
    CorruptPayload,
    UnsupportedPayload,
    can_decompress,
    decompressed_chunks,
    detect_format,
)
from boot.vmlinux import parse_vmlinux
from tests.assets import compress_like_kernel, linux_assets  # noqa: F401 - linux_assets is a fixture
from vmm.errors import PyvmmError

# Compressible but not trivial, like a kernel image.
DATA = b"\x7fELF" + (bytes(range(256)) * 64 + os.urandom(4096)) * 15
FORMATS = ["gzip", "bzip2", "lzma", "xz", "lz4", "zstd", "uncompressed"]


def decompress_payload(payload, limit):
    chunks = [bytes(chunk) for chunk in decompressed_chunks(payload, limit)]  # each lives until the next
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)
    return b"".join(chunks)


@pytest.fixture(scope="module", params=FORMATS)
def compressed(request):
    return request.param, compress_like_kernel(DATA, request.param)


def test_round_trip(compressed):
    name, payload = compressed
    assert detect_format(payload).name == name
    assert can_decompress(payload)
    assert decompress_payload(payload, limit=len(DATA)) == DATA


def test_small_payload_round_trip():
    for name in FORMATS:
        assert decompress_payload(compress_like_kernel(b"\x7fELF tiny", name), 1 << 20) == b"\x7fELF tiny"


def test_refuses_more_than_the_limit(compressed):
    _, payload = compressed
    with pytest.raises(CorruptPayload, match="more than"):
        decompress_payload(payload, limit=len(DATA) - 1)


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "uncompressed"])
def test_truncated_payload_is_a_clean_error(name):
    payload = compress_like_kernel(DATA, name)
    with pytest.raises(PyvmmError) as caught:
        decompress_payload(payload[: len(payload) // 2], limit=1 << 31)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("offset", [0.1, 0.5, 0.9])
def test_corrupted_payload_never_crashes(compressed, offset):
    name, payload = compressed
    data = bytearray(payload)
    middle = int(len(data) * offset)
    data[middle : middle + 64] = bytes(64)
    try:
        out = decompress_payload(bytes(data), limit=1 << 31)
    except PyvmmError as err:
        assert "\n" not in str(err)
    else:
        # Formats without a checksum (lz4, lzma, none) may decode garbage, but
        # never more or less than announced.
        assert name in ("lz4", "lzma", "uncompressed")
        assert len(out) == len(DATA)


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "uncompressed"])
def test_size_trailer_smaller_than_the_data_is_caught(name):
    payload = compress_like_kernel(DATA, name)
    lying = payload[:-4] + struct.pack("<I", len(DATA) // 2)
    with pytest.raises(CorruptPayload):
        decompress_payload(lying, limit=1 << 31)


def test_an_lzma_header_asking_for_a_huge_dictionary_is_refused():
    """The header's dictionary size is the user's file speaking: 4 GiB is refused, not allocated."""
    header = b"\x5d" + struct.pack("<I", 0xFFFF_0000) + struct.pack("<q", -1)
    payload = header + bytes(64) + struct.pack("<I", 1 << 20)
    with pytest.raises(CorruptPayload, match="corrupt lzma kernel payload: .*[Mm]emory"):
        decompress_payload(payload, 1 << 30)


def test_lzo_is_recognised_but_not_decodable():
    payload = b"\x89LZO\x00\r\n\x1a\n" + bytes(100)
    assert detect_format(payload).name == "lzo"
    assert not can_decompress(payload)
    with pytest.raises(UnsupportedPayload, match="lzo"):
        decompress_payload(payload, 1 << 20)


def test_unknown_format():
    assert detect_format(b"garbage!" * 4) is None
    assert not can_decompress(b"garbage!" * 4)
    with pytest.raises(UnsupportedPayload, match="unknown kernel compression"):
        decompress_payload(b"garbage!" * 4, 1 << 20)


def test_too_short_payload():
    with pytest.raises(CorruptPayload, match="too short"):
        decompress_payload(b"\x1f\x8b\x08", 1 << 20)


@pytest.mark.parametrize("name", FORMATS)
def test_output_over_a_chunk_comes_in_chunks(name):
    data = b"\x7fELF" + (bytes(range(256)) + os.urandom(64)) * 30_000  # over 8 MiB: lz4's two blocks
    chunks = [bytes(chunk) for chunk in decompressed_chunks(compress_like_kernel(data, name), len(data))]
    assert len(chunks) >= 2
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)
    assert b"".join(chunks) == data


LZ4_DECODERS = ["liblz4", "python-lz4"]
TWO_BLOCKS = b"\x7fELF" + (bytes(range(256)) + os.urandom(64)) * 30_000  # over lz4's 8 MiB block


@pytest.fixture(params=LZ4_DECODERS)
def lz4_decoder(request, monkeypatch):
    """Each of the two LZ4 decoders in turn: liblz4's, which every Debian system has, and
    python-lz4's, used where liblz4.so.1 cannot be loaded."""
    if request.param == "python-lz4":
        monkeypatch.setattr(lz4_legacy, "liblz4_decoder", lambda: None)
    else:
        assert lz4_legacy.liblz4_decoder() is not None, f"{lz4_legacy.LIBLZ4} did not load"
    return request.param


def test_each_lz4_decoder_round_trips_several_blocks(lz4_decoder):
    assert decompress_payload(compress_like_kernel(TWO_BLOCKS, "lz4"), len(TWO_BLOCKS)) == TWO_BLOCKS


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_each_lz4_decoder_refuses_a_truncated_block_in_one_line(lz4_decoder, cut):
    payload = compress_like_kernel(TWO_BLOCKS, "lz4")
    truncated = payload[: int(len(payload) * cut)] + payload[-4:]  # the size trailer kept
    with pytest.raises(CorruptPayload, match="^corrupt lz4 kernel payload: [^\n]*truncated$"):
        decompress_payload(truncated, limit=1 << 31)


def test_each_lz4_decoder_refuses_a_block_that_is_not_lz4_in_one_line(lz4_decoder):
    # A token of 0xff asks for more literal bytes than the block holds.
    payload = struct.pack("<II", lz4_legacy.MAGIC, 64) + b"\xff" * 64 + struct.pack("<I", 1 << 20)
    with pytest.raises(CorruptPayload, match="^corrupt lz4 kernel payload: [^\n]*$"):
        decompress_payload(payload, limit=1 << 31)


def test_each_lz4_decoder_refuses_a_block_longer_than_any_8_mib_compresses_to(lz4_decoder, tmp_path):
    # A hostile bzImage of over 2 GiB (sparse here, mapped as the loader's memoryview would be)
    # whose one block claims all of it: both decoders take the length as a C int, and over
    # 2 GiB it does not fit (OverflowError, a traceback). The kernel refuses any block over
    # LZ4_COMPRESSBOUND(8 MiB); so does pyvmm, before decoding.
    length = (1 << 31) + 16
    path = tmp_path / "payload"
    with path.open("wb") as f:
        f.write(struct.pack("<II", lz4_legacy.MAGIC, length))
        f.truncate(8 + length)
        f.seek(8 + length)
        f.write(struct.pack("<I", 1 << 20))
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as payload:
        with pytest.raises(CorruptPayload, match="^corrupt lz4 kernel payload: lz4 block of 2147483664 bytes "
                                                 "at 0x4 is longer than 8388608 bytes compress to$"):
            decompress_payload(memoryview(payload), limit=1 << 31)


def test_an_lz4_block_as_long_as_8_mib_can_compress_to_is_decoded(lz4_decoder):
    # Incompressible data: each 8 MiB block comes out longer than it went in, up to the bound.
    data = b"\x7fELF" + os.urandom(lz4_legacy.BLOCK_SIZE + 100)
    payload = compress_like_kernel(data, "lz4")
    (first,) = struct.unpack_from("<I", payload, 4)
    assert lz4_legacy.BLOCK_SIZE < first <= lz4_legacy.MAX_BLOCK_LENGTH
    assert decompress_payload(payload, len(data)) == data


def test_liblz4_decodes_every_block_into_one_buffer():
    """What the chunks' lifetime rule is for: no fresh 8 MiB for each block."""
    chunks = decompressed_chunks(compress_like_kernel(TWO_BLOCKS, "lz4"), len(TWO_BLOCKS))
    first = next(chunks)
    first_bytes = bytes(first)
    second = next(chunks)
    assert first.obj is second.obj
    assert first_bytes + bytes(second) == TWO_BLOCKS


def test_lz4_concatenated_streams():
    payload = compress_like_kernel(b"A" * 1000, "lz4")[:-4]
    second = compress_like_kernel(b"B" * 1000, "lz4")[:-4]
    joined = payload + second + struct.pack("<I", 2000)
    assert decompress_payload(joined, 1 << 20) == b"A" * 1000 + b"B" * 1000


def test_real_debian_kernel_decompresses_to_vmlinux(linux_assets):  # noqa: F811
    image = parse_bzimage(linux_assets.kernel.read_bytes())
    assert detect_format(image.payload).name == "lz4"
    vmlinux = parse_vmlinux(decompress_payload(image.payload, limit=1 << 30))
    assert vmlinux.entry == image.load_address == 0x100_0000  # phys_startup_64
    assert vmlinux.start == 0x100_0000
    # The decompressor's init_size leaves room for everything the vmlinux loads.
    assert vmlinux.end <= image.load_address + image.init_size
