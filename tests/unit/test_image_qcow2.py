"""The qcow2 library on its own: layouts, reads and writes, backing chains, COW, growth."""

from __future__ import annotations

import os
import random

import pytest

from vmm.image.base import ImageRangeError, ReadOnlyImageError
from vmm.image.open import create_image, open_image
from vmm.image.qcow2 import Qcow2Image
from vmm.image.qcow2_check import check_qcow2
from vmm.image.qcow2_create import parse_qcow2_options
from vmm.image.qcow2_format import OFLAG_COMPRESSED

MiB = 1 << 20


def make(path, size=8 * MiB, options=None, **kwargs):
    create_image(str(path), "qcow2", size, options=parse_qcow2_options(options), **kwargs)
    return str(path)


def assert_clean(path):
    with open_image(path, backing=False) as image:
        result = check_qcow2(image)
    assert (result.corruptions, result.leaks) == (0, 0), result.messages


def test_new_image_has_qemus_layout(tmp_path):
    path = make(tmp_path / "a.qcow2", 1 << 30)
    with open(path, "rb") as f:
        head = f.read(112)
    assert head[:4] == b"QFI\xfb"
    assert int.from_bytes(head[4:8], "big") == 3
    assert int.from_bytes(head[40:48], "big") == 3 * 65536  # L1 table
    assert int.from_bytes(head[48:56], "big") == 65536  # refcount table
    assert os.path.getsize(path) == 4 * 65536
    assert_clean(path)


def test_fresh_image_reads_zeros_and_maps_as_zero(tmp_path):
    with open_image(make(tmp_path / "a.qcow2")) as image:
        assert image.read(0, 4096) == bytes(4096)
        assert [(e.offset, e.length, e.kind) for e in image.map()] == [(0, 8 * MiB, "zero")]


@pytest.mark.parametrize("options", ["", "compat=0.10", "cluster_size=512", "cluster_size=2M",
                                     "refcount_bits=1", "refcount_bits=4", "refcount_bits=64"])
def test_writes_read_back_across_layouts(tmp_path, options):
    path = make(tmp_path / "a.qcow2", 16 * MiB, options)
    model = bytearray(16 * MiB)
    rnd = random.Random(options)
    with open_image(path, readonly=False) as image:
        for _ in range(60):
            offset = rnd.randrange(16 * MiB - 70000)
            data = rnd.randbytes(rnd.randrange(1, 70000))
            image.write(offset, data)
            model[offset : offset + len(data)] = data
        assert image.read(0, len(model)) == model
    with open_image(path) as image:
        assert image.read(0, len(model)) == model
    assert_clean(path)


def test_partial_cluster_write_keeps_the_rest_of_the_backing_cluster(tmp_path):
    base = make(tmp_path / "base.qcow2")
    with open_image(base, readonly=False) as image:
        image.write(0, b"\xaa" * 65536)
    top = make(tmp_path / "top.qcow2", backing_file="base.qcow2", backing_format="qcow2")
    with open_image(top, readonly=False) as image:
        image.write(100, b"\xbb" * 10)
        assert image.read(0, 65536) == b"\xaa" * 100 + b"\xbb" * 10 + b"\xaa" * (65536 - 110)
    with open_image(base) as image:
        assert image.read(0, 65536) == b"\xaa" * 65536  # the base is untouched
    assert_clean(top)


def test_backing_chain_of_many_layers_reads_through(tmp_path):
    names = []
    for i in range(40):
        name = f"l{i}.qcow2"
        kwargs = {"backing_file": names[-1], "backing_format": "qcow2"} if names else {}
        make(tmp_path / name, 4 * MiB, **kwargs)
        with open_image(str(tmp_path / name), readonly=False) as image:
            image.write(i * 65536, bytes([i + 1]) * 10)
        names.append(name)
    with open_image(str(tmp_path / names[-1])) as image:
        for i in range(40):
            assert image.read(i * 65536, 11) == bytes([i + 1]) * 10 + b"\0"


def test_smaller_backing_file_reads_zero_beyond_its_end(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x55" * 1000)
    top = make(tmp_path / "top.qcow2", 1 * MiB, backing_file="base.raw", backing_format="raw")
    with open_image(top, readonly=False) as image:
        assert image.read(990, 20) == b"\x55" * 10 + bytes(10)
        image.write(2000, b"x")  # COW of a cluster that is partly beyond the backing file
        assert image.read(0, 2001) == b"\x55" * 1000 + bytes(1000) + b"x"


def test_write_zeroes_hides_backing_data_and_frees_clusters(tmp_path):
    base = make(tmp_path / "base.qcow2")
    with open_image(base, readonly=False) as image:
        image.write(0, b"\x11" * (4 * 65536))
    top = make(tmp_path / "top.qcow2", backing_file="base.qcow2", backing_format="qcow2")
    with open_image(top, readonly=False) as image:
        image.write(0, b"\x22" * (2 * 65536))
        image.write_zeroes(1000, 3 * 65536)
        assert image.read(0, 1000) == b"\x22" * 1000
        assert image.read(1000, 3 * 65536) == bytes(3 * 65536)
        assert image.read(1000 + 3 * 65536, 10) == b"\x11" * 10
        kinds = [e.kind for e in image.map(65536, 2 * 65536)]
        assert kinds == ["zero"]
    assert_clean(top)


def test_write_zeroes_on_version_2_over_a_backing_file_writes_real_zeros(tmp_path):
    base = make(tmp_path / "base.qcow2")
    with open_image(base, readonly=False) as image:
        image.write(0, b"\x11" * 65536)
    top = make(tmp_path / "top.qcow2", options="compat=0.10", backing_file="base.qcow2",
               backing_format="qcow2")
    with open_image(top, readonly=False) as image:
        image.write_zeroes(0, 65536)
        assert image.read(0, 65536) == bytes(65536)
    assert_clean(top)


def test_discard_frees_clusters_for_reuse(tmp_path):
    path = make(tmp_path / "a.qcow2")
    with open_image(path, readonly=False) as image:
        image.write(0, b"\x01" * (8 * 65536))
        image.flush()
        size_before = os.path.getsize(path)
        image.discard(0, 8 * 65536)
        image.flush()  # the frees reach the disk; now the clusters may be reused
        image.write(0, b"\x02" * (8 * 65536))
        image.flush()
        assert os.path.getsize(path) == size_before
        assert image.read(0, 8 * 65536) == b"\x02" * (8 * 65536)
    assert_clean(path)


def test_clusters_freed_by_an_earlier_session_are_reused(tmp_path):
    path = make(tmp_path / "a.qcow2")
    with open_image(path, readonly=False) as image:
        image.write(0, b"\x01" * (8 * 65536))
    size_before = os.path.getsize(path)
    with open_image(path, readonly=False) as image:
        image.discard(0, 8 * 65536)
    with open_image(path, readonly=False) as image:
        image.write(65536, b"\x02" * (8 * 65536))
        assert image.read(0, 9 * 65536) == bytes(65536) + b"\x02" * (8 * 65536)
    assert os.path.getsize(path) <= size_before + 65536
    assert_clean(path)


def test_compressed_writes_pack_clusters_and_read_back(tmp_path):
    path = make(tmp_path / "a.qcow2", 4 * MiB, "cluster_size=4096")
    rnd = random.Random(5)
    clusters = [bytes(rnd.choice(b"ab") for _ in range(4096)) for _ in range(100)]
    with open_image(path, readonly=False) as image:
        for i, data in enumerate(clusters):
            image.write_compressed(i * 4096, data)
        entry = image._l2_entry(0)
        assert entry & OFLAG_COMPRESSED
    with open_image(path, readonly=False) as image:
        assert image.read(0, 100 * 4096) == b"".join(clusters)
        image.write(4096 + 10, b"new")  # copies the compressed cluster out
        assert image.read(4096, 4096) == clusters[1][:10] + b"new" + clusters[1][13:]
    assert_clean(path)
    # Packed: far fewer host clusters than guest clusters.
    assert os.path.getsize(path) < 60 * 4096


def test_compressed_writes_respect_one_bit_refcounts(tmp_path):
    path = make(tmp_path / "a.qcow2", 1 * MiB, "cluster_size=4096,refcount_bits=1")
    data = [bytes([i]) * 4096 for i in range(1, 30)]
    with open_image(path, readonly=False) as image:
        for i, cluster in enumerate(data):
            image.write_compressed(i * 4096, cluster)
    with open_image(path) as image:
        assert image.read(0, 29 * 4096) == b"".join(data)
    assert_clean(path)


def test_zstd_compressed_image_round_trips(tmp_path):
    pytest.importorskip("zstandard", reason="pip install zstandard")
    path = make(tmp_path / "a.qcow2", 1 * MiB, "compression_type=zstd")
    with open_image(path, readonly=False) as image:
        image.write_compressed(0, b"zstd" * 16384)
    with open_image(path) as image:
        assert image.read(0, 65536) == b"zstd" * 16384
    assert_clean(path)


def test_growing_past_the_l1_table_relocates_it(tmp_path):
    path = make(tmp_path / "a.qcow2", 1 * MiB, "cluster_size=512")
    with open_image(path, readonly=False) as image:
        image.write(0, b"head")
        image.resize(64 * MiB)  # L1 grows from 1 entry to 2048: a new table
        image.write(64 * MiB - 4, b"tail")
    with open_image(path) as image:
        assert image.size == 64 * MiB
        assert image.read(0, 4) == b"head"
        assert image.read(64 * MiB - 4, 4) == b"tail"
    assert_clean(path)


def test_many_small_clusters_grow_the_refcount_table(tmp_path):
    # 512-byte clusters with 16-bit refcounts: one refcount block counts 256
    # clusters and the one-cluster table holds 64 blocks, so 16 MiB of data
    # needs a bigger, relocated refcount table.
    path = make(tmp_path / "a.qcow2", 32 * MiB, "cluster_size=512")
    data = random.Random(1).randbytes(16 * MiB)
    with open_image(path, readonly=False) as image:
        image.write(0, data)
        image.flush()
        assert image._reftable_clusters > 1
    with open_image(path) as image:
        assert image.read(0, len(data)) == data
    assert_clean(path)


def test_out_of_range_and_read_only_access_is_refused(tmp_path):
    path = make(tmp_path / "a.qcow2")
    with open_image(path) as image:
        with pytest.raises(ImageRangeError):
            image.read(8 * MiB - 1, 2)
        with pytest.raises(ReadOnlyImageError):
            image.write(0, b"x")


def test_unflushed_metadata_is_lost_but_the_image_stays_consistent(tmp_path):
    path = make(tmp_path / "a.qcow2")
    image = open_image(path, readonly=False)
    image.write(0, b"kept")
    image.flush()
    image.write(65536 * 3, b"lost")
    assert isinstance(image, Qcow2Image)
    image.abandon()  # like a crash: cached metadata never reaches the disk
    with open_image(path) as image:
        assert image.read(0, 4) == b"kept"
        assert image.read(65536 * 3, 4) == bytes(4)
    with open_image(path, backing=False) as image:
        result = check_qcow2(image)
    assert result.corruptions == 0  # only leaks are allowed


def test_check_repairs_leaks(tmp_path):
    path = make(tmp_path / "a.qcow2")
    with open_image(path, readonly=False) as image:
        image.write(0, b"x" * 65536)
        image._pwrite(image._alloc_cluster(), bytes(65536))  # counted, used by nothing
    with open_image(path, backing=False) as image:
        assert check_qcow2(image).leaks == 1
    with open_image(path, readonly=False, backing=False, repair=True) as image:
        result = check_qcow2(image, repair="leaks")
        assert (result.leaks_fixed, result.leaks, result.corruptions) == (1, 0, 0)
    assert_clean(path)
