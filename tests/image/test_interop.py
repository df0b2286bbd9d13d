"""pyvmm and qemu-img/qemu-io read and check each other's images."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from click.testing import CliRunner

from vmm.cli import cli
from vmm.image.open import create_image, open_image
from vmm.image.qcow2_create import parse_qcow2_options

MiB = 1 << 20
SIZE = 16 * MiB


def pyvmm_img(*args, expect=0):
    result = CliRunner().invoke(cli, ["img", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == expect, result.stdout + result.stderr
    return result


def random_workload(seed, size, cluster):
    """Writes (with sub-cluster and cluster-crossing ones) and zeroings, as (kind, offset, data)."""
    rnd = random.Random(seed)
    ops = []
    for _ in range(80):
        offset = rnd.randrange(size - 300_000)
        if rnd.random() < 0.15:
            length = rnd.randrange(1, 4) * cluster + rnd.randrange(0, 2) * rnd.randrange(cluster)
            offset = rnd.randrange(size - length)
            ops.append(("zero", offset, length))
        else:
            ops.append(("write", offset, rnd.randbytes(rnd.randrange(1, 200_000))))
    return ops


def apply(image, ops):
    for kind, offset, arg in ops:
        if kind == "zero":
            image.write_zeroes(offset, arg)
        else:
            image.write(offset, arg)


LAYOUTS = ["", "compat=0.10", "cluster_size=512", "cluster_size=4096,refcount_bits=1",
           "cluster_size=2M", "refcount_bits=64", "refcount_bits=8,compression_type=zstd"]


@pytest.mark.parametrize("options", LAYOUTS)
def test_pyvmm_written_images_pass_qemu_check_and_compare(tmp_path, qemu, options):
    path, raw = tmp_path / "disk.qcow2", tmp_path / "disk.raw"
    opts = parse_qcow2_options(options)
    create_image(str(path), "qcow2", SIZE, options=opts)
    create_image(str(raw), "raw", SIZE)
    ops = random_workload(options, SIZE, opts.cluster_size)
    with open_image(str(path), readonly=False) as image, open_image(str(raw), readonly=False) as flat:
        apply(image, ops[:40])
        image.flush()
        apply(image, ops[40:])
        apply(flat, ops)
    qemu("qemu-img", "check", path)
    assert qemu("qemu-img", "compare", "-f", "qcow2", "-F", "raw", path, raw).returncode == 0
    ours = json.loads(pyvmm_img("info", "--output=json", path).stdout)
    theirs = json.loads(qemu("qemu-img", "info", "--output=json", path).stdout)
    assert ours == theirs


def test_pyvmm_overlay_on_a_qemu_base(tmp_path, qemu):
    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "flat.raw"
    qemu("qemu-img", "create", "-f", "qcow2", base, "16M")
    qemu("qemu-io", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 100k", base)
    pyvmm_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu("qemu-img", "convert", "-O", "raw", base, raw)
    ops = random_workload(7, SIZE, 65536)
    with open_image(str(top), readonly=False) as image, open_image(str(raw), readonly=False) as flat:
        apply(image, ops)
        apply(flat, ops)
    qemu("qemu-img", "check", top)
    qemu("qemu-img", "compare", top, raw)
    ours = pyvmm_img("info", "--output=json", "--backing-chain", top).stdout
    theirs = qemu("qemu-img", "info", "--output=json", "--backing-chain", top).stdout
    assert ours == theirs  # the very same text, key order included
    assert pyvmm_img("info", top).stdout == qemu("qemu-img", "info", top).stdout


def read_all(path, fmt=None):
    with open_image(str(path), fmt) as image:
        return image.read(0, image.size)


def qemu_flat(qemu, tmp_path, path, *extra):
    out = tmp_path / "reference.raw"
    if out.exists():
        out.unlink()
    qemu("qemu-img", "convert", *extra, "-O", "raw", path, out)
    return out.read_bytes()


QEMU_IO_WRITES = ["write -P 0xa1 0 64k", "write -P 0xb2 70000 300k", "write -P 0xc3 15M 1M",
                  "write -P 0xd4 4095 2"]


@pytest.mark.parametrize("options", ["compat=0.10", "compat=1.1", "cluster_size=512",
                                     "refcount_bits=1", "cluster_size=2M",
                                     "compression_type=zstd"])
def test_qemu_made_images_read_back_identically(tmp_path, qemu, options):
    path = tmp_path / "q.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", "-o", options, path, "16M")
    qemu("qemu-io", *[a for w in QEMU_IO_WRITES for a in ("-c", w)], path)
    assert read_all(path) == qemu_flat(qemu, tmp_path, path)


def test_qemu_zero_clusters(tmp_path, qemu):
    path = tmp_path / "z.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", path, "16M")
    qemu("qemu-io", "-c", "write -P 0x55 0 2M", "-c", "write -z 64k 192k", "-c",
         "write -z -u 1M 128k", path)
    data = read_all(path)
    assert data == qemu_flat(qemu, tmp_path, path)
    assert data[65536 : 65536 + 192 * 1024] == bytes(192 * 1024)
    with open_image(str(path)) as image:
        kinds = {e.kind for e in image.map(65536, 192 * 1024)}
        assert kinds == {"zero"}


def test_qemu_backing_chain(tmp_path, qemu):
    names = ["base.raw", "mid.qcow2", "top.qcow2"]
    qemu("qemu-img", "create", "-f", "raw", tmp_path / names[0], "8M")
    qemu("qemu-io", "-f", "raw", "-c", "write -P 1 0 8M", tmp_path / names[0])
    qemu("qemu-img", "create", "-f", "qcow2", "-b", names[0], "-F", "raw", tmp_path / names[1], "12M")
    qemu("qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 64k", tmp_path / names[1])
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", "-b", names[1], "-F", "qcow2",
         tmp_path / names[2], "16M")
    qemu("qemu-io", "-c", "write -P 3 1536k 4k", "-c", "write -P 4 11M 2M", tmp_path / names[2])
    top = tmp_path / names[2]
    assert read_all(top) == qemu_flat(qemu, tmp_path, top)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_qemu_compressed_images(tmp_path, qemu, compression):
    src = tmp_path / "src.raw"
    rnd = random.Random(3)
    with open(src, "wb") as f:
        for i in range(64):
            f.write(bytes(rnd.choice(b"xyz") for _ in range(4096)) * 16 if i % 3 else bytes(65536))
    out = tmp_path / "c.qcow2"
    qemu("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
         src, out)
    assert read_all(out) == src.read_bytes()
    # Writing into compressed clusters copies them out; qemu still agrees.
    with open_image(str(out), readonly=False) as image:
        image.write(65536 + 100, b"patched")
    expected = bytearray(src.read_bytes())
    expected[65536 + 100 : 65536 + 107] = b"patched"
    qemu("qemu-img", "check", out)
    assert qemu_flat(qemu, tmp_path, out) == expected


def test_pyvmm_convert_compressed_is_read_by_qemu(tmp_path, qemu):
    src = tmp_path / "src.raw"
    src.write_bytes(b"".join(bytes([i % 7]) * 65536 + os.urandom(100) * 20 for i in range(40)))
    for options in ("compression_type=zlib", "compression_type=zstd,cluster_size=4096"):
        out = tmp_path / "c.qcow2"
        pyvmm_img("convert", "-c", "-O", "qcow2", "-o", options, src, out)
        report = qemu("qemu-img", "check", out).stdout
        assert "No errors were found" in report, report
        assert re.search(r"\b[1-9][\d.]*% compressed clusters", report), report  # compressed, not copied
        qemu("qemu-img", "compare", "-F", "raw", out, src)
        flat, data = qemu_flat(qemu, tmp_path, out), src.read_bytes()
        # The image's size is the source's rounded up to whole sectors, the rest zeros.
        assert len(flat) == -(-len(data) // 512) * 512 and flat == data + bytes(len(flat) - len(data))


def test_internal_snapshots(tmp_path, qemu):
    path = tmp_path / "s.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", path, "16M")
    qemu("qemu-io", "-c", "write -P 0x10 0 1M", path)
    qemu("qemu-img", "snapshot", "-c", "first", path)
    qemu("qemu-io", "-c", "write -P 0x20 512k 1M", path)
    qemu("qemu-img", "snapshot", "-c", "second", path)
    qemu("qemu-io", "-c", "write -P 0x30 0 64k", path)
    assert read_all(path) == qemu_flat(qemu, tmp_path, path)
    ours = pyvmm_img("snapshot", "-l", path).stdout
    assert ours == qemu("qemu-img", "snapshot", "-l", path).stdout
    assert json.loads(pyvmm_img("info", "--output=json", path).stdout) == json.loads(
        qemu("qemu-img", "info", "--output=json", path).stdout)
    first = qemu_flat(qemu, tmp_path, path, "-l", "snapshot.name=first")
    # Writing into clusters shared with snapshots copies them; the snapshots stay intact.
    with open_image(str(path), readonly=False) as image:
        image.write(1000, b"new data" * 1000)
        image.write_zeroes(4 * MiB, 64 * 1024)
        expected = image.read(0, image.size)
    qemu("qemu-img", "check", path)
    assert qemu_flat(qemu, tmp_path, path) == expected
    assert qemu_flat(qemu, tmp_path, path, "-l", "snapshot.name=first") == first


def test_dirty_image_left_by_a_crashed_qemu_is_repaired_on_open(tmp_path, qemu):
    path = tmp_path / "lazy.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "16M")
    qemu("qemu-io", "-c", "write -P 7 0 256k", "-c", "abort", path, check=False)
    assert qemu("qemu-img", "check", path, check=False).returncode == 2
    assert json.loads(pyvmm_img("info", "--output=json", path).stdout)["dirty-flag"] is True
    with open_image(str(path), readonly=False) as image:
        image.write(1 * MiB, b"x")
    qemu("qemu-img", "check", path)
    assert json.loads(qemu("qemu-img", "info", "--output=json", path).stdout)["dirty-flag"] is False
    assert read_all(path)[: 256 * 1024] == b"\x07" * 256 * 1024


def test_check_agrees_with_qemu_on_leaks_and_repair(tmp_path, qemu):
    path = tmp_path / "leak.qcow2"
    pyvmm_img("create", "-f", "qcow2", path, "16M")
    with open_image(str(path), readonly=False) as image:
        image.write(0, b"x" * 200_000)
        for _ in range(2):  # clusters counted and written but mapped by nothing
            image._pwrite(image._alloc_cluster(), bytes(65536))
    theirs = qemu("qemu-img", "check", path, check=False)
    ours = pyvmm_img("check", path, expect=3)
    assert theirs.returncode == 3
    assert ours.stdout == theirs.stdout and ours.stderr == theirs.stderr
    assert json.loads(pyvmm_img("check", "--output=json", path, expect=3).stdout) == json.loads(
        qemu("qemu-img", "check", "--output=json", path, check=False).stdout)
    pyvmm_img("check", "-r", "leaks", path)
    qemu("qemu-img", "check", path)


def test_resize_is_accepted_by_qemu(tmp_path, qemu):
    path = tmp_path / "r.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", path, "1M")
    qemu("qemu-io", "-c", "write -P 9 0 1M", path)
    pyvmm_img("resize", path, "+100M")
    with open_image(str(path), readonly=False) as image:
        image.write(100 * MiB, b"end" * 100)
    qemu("qemu-img", "check", path)
    info = json.loads(qemu("qemu-img", "info", "--output=json", path).stdout)
    assert info["virtual-size"] == 101 * MiB
    assert qemu_flat(qemu, tmp_path, path) == read_all(path)


def test_persistent_bitmaps_are_counted_and_invalidated_like_qemu_does(tmp_path, qemu):
    path = tmp_path / "bm.qcow2"
    qemu("qemu-img", "create", "-f", "qcow2", path, "64M")
    qemu("qemu-io", "-c", "write 0 1M", path)
    qemu("qemu-img", "bitmap", "--add", path, "b0")
    qemu("qemu-io", "-c", "write 4M 1M", path)
    pyvmm_img("check", path)  # the bitmap's clusters are referenced, not leaked
    # pyvmm does not maintain bitmaps: its first write marks them stale (autoclear
    # bit), after which both tools see their clusters as leaks.
    with open_image(str(path), readonly=False) as image:
        image.write(0, b"x")
    assert qemu("qemu-img", "check", path, check=False).returncode == 3
    pyvmm_img("check", "-r", "leaks", path)
    qemu("qemu-img", "check", path)
