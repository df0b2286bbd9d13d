"""A write into part of a cluster never used before writes only its own bytes.

qcow2 gives a new cluster to every write into an unallocated one; the rest of
that cluster must read as zeros. A cluster claimed past the end of the file
reads as zeros already, so only the written bytes go to the file (the rest
stays a hole, as with qemu-img); a cluster reused after being freed holds old
data, so its rest is written as zeros.
"""

from __future__ import annotations

import os

from vmm.image.open import create_image, open_image

MiB = 1 << 20
CLUSTER = 64 * 1024
SIZE = 16 * MiB


def test_a_4k_write_into_a_fresh_cluster_writes_4k_and_reads_back_with_zeros_around(tmp_path, qemu):
    path = tmp_path / "disk.qcow2"
    create_image(str(path), "qcow2", SIZE)
    before = os.stat(path).st_blocks
    with open_image(str(path), readonly=False) as image:
        image.write(5 * CLUSTER + 8192, b"\xab" * 4096)
        # Read back before any flush: the cluster, last in the file, is there in full.
        assert image.read(5 * CLUSTER, CLUSTER) == bytes(8192) + b"\xab" * 4096 + bytes(CLUSTER - 12288)
        image.flush()
    assert os.path.getsize(path) % CLUSTER == 0
    # The data and one L2 table (plus refcount updates in place), not a whole zero-filled data cluster.
    assert (os.stat(path).st_blocks - before) * 512 < CLUSTER + 2 * 4096 + 4096
    qemu("qemu-img", "check", path)
    flat = tmp_path / "flat.raw"
    qemu("qemu-img", "convert", "-O", "raw", path, flat)
    expected = bytearray(SIZE)
    expected[5 * CLUSTER + 8192 : 5 * CLUSTER + 12288] = b"\xab" * 4096
    assert flat.read_bytes() == expected


def test_a_cluster_reused_after_a_discard_gets_its_old_bytes_overwritten_with_zeros(tmp_path, qemu):
    path = tmp_path / "disk.qcow2"
    create_image(str(path), "qcow2", SIZE)
    with open_image(str(path), readonly=False) as image:
        image.write(0, b"\x5a" * CLUSTER)  # a whole cluster of old data
        image.discard(0, CLUSTER)
        image.flush()  # its freeing is on disk: the cluster may be handed out again
        image.write(3 * CLUSTER + 100, b"new")
        assert image.read(3 * CLUSTER, CLUSTER) == bytes(100) + b"new" + bytes(CLUSTER - 103)
    qemu("qemu-img", "check", path)
    flat = tmp_path / "flat.raw"
    qemu("qemu-img", "convert", "-O", "raw", path, flat)
    expected = bytearray(SIZE)
    expected[3 * CLUSTER + 100 : 3 * CLUSTER + 103] = b"new"
    assert flat.read_bytes() == expected


def test_a_partial_write_over_a_backing_file_keeps_the_backing_bytes_around_it(tmp_path, qemu):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", base, "16M")
    qemu("qemu-io", "-c", f"write -P 0x11 0 {CLUSTER}", base)
    qemu("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    with open_image(str(top), readonly=False) as image:
        image.write(4096, b"\x22" * 4096)
    expected = b"\x11" * 4096 + b"\x22" * 4096 + b"\x11" * (CLUSTER - 8192)
    with open_image(str(top)) as image:
        assert image.read(0, CLUSTER) == expected
    qemu("qemu-img", "check", top)
