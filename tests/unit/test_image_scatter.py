"""read_into / write_from: disk data straight into and out of many buffers (virtio-blk's guest pages)."""

from __future__ import annotations

import os

import pytest

from vmm.image.base import ImageRangeError, ReadOnlyImageError
from vmm.image.open import create_image, open_image

SIZE = 64 * 1024
PATTERN = bytes(range(256)) * (SIZE // 256)


@pytest.fixture(params=["raw", "qcow2"])
def image_path(request, tmp_path):
    path = str(tmp_path / f"disk.{request.param}")
    create_image(path, request.param, SIZE)
    with open_image(path, readonly=False) as image:
        image.write(0, PATTERN)
    return path


def buffers(*sizes: int) -> list[memoryview]:
    return [memoryview(bytearray(size)) for size in sizes]


def test_read_into_scatters_in_order(image_path):
    with open_image(image_path) as image:
        parts = buffers(1, 4095, 512, 3000)
        image.read_into(100, parts)
        assert b"".join(parts) == PATTERN[100 : 100 + 1 + 4095 + 512 + 3000]


def test_more_buffers_than_one_system_call_takes(image_path):
    with open_image(image_path) as image:
        parts = buffers(*[3] * 3000)  # raw: three preadv calls of at most 1024
        image.read_into(7, parts)
        assert b"".join(parts) == PATTERN[7 : 7 + 9000]


def test_write_from_gathers_in_order(image_path):
    data = os.urandom(9000)
    with open_image(image_path, readonly=False) as image:
        parts = [memoryview(data)[0:1], memoryview(data)[1:5000], memoryview(data)[5000:]]
        image.write_from(333, parts)
        assert image.read(333, 9000) == data
        assert image.read(0, 333) == PATTERN[:333]


def test_ranges_and_read_only_are_checked(image_path):
    with open_image(image_path) as image:
        with pytest.raises(ImageRangeError):
            image.read_into(SIZE - 10, buffers(5, 6))
        with pytest.raises(ReadOnlyImageError):
            image.write_from(0, buffers(512))


def test_a_raw_file_that_shrank_reads_as_zeros_past_its_end(tmp_path):
    path = str(tmp_path / "disk.raw")
    create_image(path, "raw", SIZE)
    with open_image(path, readonly=False) as image:
        image.write(0, PATTERN)
        os.truncate(path, 1000)  # another process shrinks it under us
        parts = [memoryview(bytearray(b"\xff" * 800)), memoryview(bytearray(b"\xff" * 800))]
        image.read_into(0, parts)
        assert b"".join(parts) == PATTERN[:1000] + bytes(600)
