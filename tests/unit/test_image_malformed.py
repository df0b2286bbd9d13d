"""Malformed images: a clear one-line error, never a crash, never a write to the file."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vmm.cli import cli
from vmm.errors import PyvmmError
from vmm.image.base import CorruptImageError, UnsupportedImageError
from vmm.image.open import create_image, open_image
from vmm.image.qcow2_check import check_qcow2
from vmm.image.qcow2_create import parse_qcow2_options
from vmm.image.qcow2_format import INCOMPAT_CORRUPT, INCOMPAT_DIRTY

MiB = 1 << 20
CS = 65536


def make(path, size=4 * MiB, options=None, data=True, **kwargs):
    create_image(str(path), "qcow2", size, options=parse_qcow2_options(options), **kwargs)
    if data:
        with open_image(str(path), readonly=False, backing=False) as image:
            image.write(0, b"\x5a" * (2 * CS))
    return str(path)


def patch(path, offset, fmt, *values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def l1_entry_offset(path):
    with open(path, "rb") as f:
        head = f.read(48)
    return struct.unpack_from(">Q", head, 40)[0]


def l2_offset(path):
    with open(path, "rb") as f:
        f.seek(l1_entry_offset(path))
        return struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00


def run_cli(*args):
    """`pyvmm img ARGS` in-process (a subprocess per call would make this file slow)."""
    result = CliRunner().invoke(cli, ["img", *args])
    # Anything but a clean exit is an escaped exception: a traceback for the user.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def assert_one_line_error(proc):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: "), proc.stderr
    assert "Traceback" not in proc.stderr


HEADER_DAMAGE = {
    "truncated header": (None, None),
    "version 4": (4, (">I", 4)),
    "cluster_bits 30": (20, (">I", 30)),
    "encrypted": (32, (">I", 1)),
    "huge L1 table": (36, (">I", 1 << 30)),
    "L1 table outside the file": (40, (">Q", 1 << 40)),
    "unaligned L1 table": (40, (">Q", 3 * CS + 8)),
    "refcount table outside the file": (48, (">Q", 1 << 40)),
    "no refcount table": (56, (">I", 0)),
    "too many snapshots": (60, (">I", 1 << 20)),
    "snapshot table outside the file": (60, (">IQ", 1, 1 << 40)),
    "unknown incompatible feature": (72, (">Q", 1 << 40)),
    "external data file": (72, (">Q", 1 << 2)),
    "extended L2 entries": (72, (">Q", 1 << 4)),
    "refcount order 7": (96, (">I", 7)),
    "header length": (100, (">I", 13)),
    "compression type without its bit": (104, (">B", 1)),
    "unknown compression type": (72, (">Q", 1 << 3)),
    "backing name outside the header cluster": (8, (">QI", CS - 4, 100)),
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_bad_headers_are_refused_without_touching_the_file(tmp_path, damage):
    path = make(tmp_path / "bad.qcow2")
    offset, change = HEADER_DAMAGE[damage]
    if offset is None:
        with open(path, "r+b") as f:
            f.truncate(50)
    else:
        patch(path, offset, *change)
    if damage == "unknown compression type":
        patch(path, 104, ">B", 7)
    before = digest(path)
    for readonly in (True, False):
        with pytest.raises(PyvmmError) as err:
            open_image(path, "qcow2", readonly=readonly)
        assert "\n" not in str(err.value)
        assert path in str(err.value)
    for command in (["info", "-f", "qcow2", path], ["check", "-f", "qcow2", path],
                    ["check", "-r", "all", "-f", "qcow2", path],
                    ["convert", "-f", "qcow2", "-O", "raw", path, str(tmp_path / "out.raw")]):
        proc = run_cli(*command)
        assert_one_line_error(proc)
        assert proc.returncode == 1
    assert not (tmp_path / "out.raw").exists()
    assert digest(path) == before


def test_unsupported_features_name_the_feature(tmp_path):
    path = make(tmp_path / "a.qcow2")
    patch(path, 32, ">I", 1)
    with pytest.raises(UnsupportedImageError, match="encrypted"):
        open_image(path)
    patch(path, 32, ">I", 0)
    patch(path, 72, ">Q", 1 << 2)
    with pytest.raises(UnsupportedImageError, match="external data file"):
        open_image(path)
    patch(path, 72, ">Q", 1 << 33)
    with pytest.raises(UnsupportedImageError, match="bit 33"):
        open_image(path)


def test_l2_table_outside_the_file_fails_reads_and_writes_only_there(tmp_path):
    path = make(tmp_path / "a.qcow2")
    patch(path, l1_entry_offset(path), ">Q", (1 << 63) | (1 << 40))
    before = digest(path)
    image = open_image(path, readonly=False)
    with pytest.raises(CorruptImageError, match="L2 table .* outside the file"):
        image.read(0, 10)
    with pytest.raises(CorruptImageError):
        image.write(0, b"x")
    with pytest.raises(CorruptImageError):
        image.write_zeroes(0, CS)
    image.close()
    assert digest(path) == before
    proc = run_cli("check", path)
    assert proc.returncode == 2
    assert "exceeding the end of the file" in proc.stderr
    assert digest(path) == before


def test_data_cluster_outside_the_file_is_an_error(tmp_path):
    path = make(tmp_path / "a.qcow2")
    patch(path, l2_offset(path), ">Q", (1 << 63) | (1 << 40))
    before = digest(path)
    with open_image(path) as image:
        with pytest.raises(CorruptImageError, match="outside the file"):
            image.read(0, 10)
        assert image.read(CS, 10) == b"\x5a" * 10  # the rest still reads
    assert digest(path) == before


def test_data_cluster_pointing_at_metadata_is_never_written(tmp_path):
    path = make(tmp_path / "a.qcow2")
    l1 = l1_entry_offset(path)
    patch(path, l2_offset(path), ">Q", (1 << 63) | l1)  # guest cluster 0 "is" the L1 table
    before = digest(path)
    image = open_image(path, readonly=False)
    with pytest.raises(CorruptImageError, match="overlaps metadata"):
        image.write(0, b"x" * 100)
    image.close()
    assert digest(path) == before


def test_l2_table_pointing_at_the_header_is_refused(tmp_path):
    path = make(tmp_path / "a.qcow2")
    patch(path, l1_entry_offset(path), ">Q", (1 << 63) | (1 << 16) * 0 | CS)  # the refcount table
    with open_image(path) as image, pytest.raises(CorruptImageError, match="overlaps"):
        image.read(0, 1)


def test_garbage_compressed_cluster_is_an_error(tmp_path):
    path = make(tmp_path / "a.qcow2", data=False)
    with open_image(path, readonly=False) as image:
        image.write_compressed(0, b"abc" * 21845 + b"x")
    with open(path, "rb") as f:
        f.seek(l2_offset(path))
        entry = struct.unpack(">Q", f.read(8))[0]
    host = entry & ((1 << 54) - 1)
    patch(path, host, ">8s", b"\xff" * 8)
    with open_image(path) as image, pytest.raises(CorruptImageError, match="decompress"):
        image.read(0, 1)


def test_refcount_overflow_is_reported_by_check(tmp_path):
    # Two guest clusters share one host cluster in a 1-bit refcount image:
    # two references cannot be counted, check must say so (and not crash).
    path = make(tmp_path / "a.qcow2", options="refcount_bits=1")
    with open(path, "rb") as f:
        f.seek(l2_offset(path))
        first = struct.unpack(">Q", f.read(8))[0]
    patch(path, l2_offset(path) + 8, ">Q", first & ~(1 << 63))
    before = digest(path)
    with open_image(path, backing=False) as image:
        result = check_qcow2(image)
    assert result.corruptions >= 1
    assert any("refcount=1 reference=2" in m for m in result.messages)
    proc = run_cli("check", "-r", "all", path)
    assert proc.returncode == 2
    assert "exceed the maximum refcount" in proc.stderr
    assert "Traceback" not in proc.stderr
    del before


def test_refcount_overflow_while_packing_compressed_data_starts_a_new_cluster(tmp_path):
    path = make(tmp_path / "a.qcow2", data=False, options="refcount_bits=1,cluster_size=4096")
    with open_image(path, readonly=False) as image:
        for i in range(8):
            image.write_compressed(i * 4096, bytes([i]) * 4096)
    with open_image(path, backing=False) as image:
        assert check_qcow2(image).corruptions == 0
        assert image.read(0, 8 * 4096) == b"".join(bytes([i]) * 4096 for i in range(8))


def test_backing_file_name_holding_a_nul_byte_is_refused(tmp_path):
    # Found by the qcow2 fuzzer (tests/fuzz/): `img convert` ended in a
    # traceback (ValueError: embedded null byte). The reduced input: an
    # overlay whose 10-byte backing name has a NUL in the middle.
    make(tmp_path / "base.qcow2", data=False)
    overlay = make(tmp_path / "overlay.qcow2", data=False, backing_file="base.qcow2", backing_format="qcow2")
    with open(overlay, "rb") as f:
        offset, length = struct.unpack_from(">QI", f.read(20), 8)
    assert length == len(b"base.qcow2")
    patch(overlay, offset, "10s", b"ba\0e.qcow2")
    before = digest(overlay)
    for args in (["convert", "-O", "raw", overlay, str(tmp_path / "out.raw")], ["info", overlay],
                 ["check", overlay]):
        proc = run_cli(*args)
        assert_one_line_error(proc)
        assert "backing file name holds a NUL byte" in proc.stderr
    assert digest(overlay) == before
    assert not (tmp_path / "out.raw").exists()


def test_backing_file_name_ending_in_a_newline_is_reported_on_one_line(tmp_path):
    # Found by the qcow2 fuzzer: the "not found" error printed the name as
    # it is, and its newline split the message in two lines.
    make(tmp_path / "base.qcow2", data=False)
    overlay = make(tmp_path / "overlay.qcow2", data=False, backing_file="base.qcow2", backing_format="qcow2")
    with open(overlay, "rb") as f:
        offset = struct.unpack_from(">Q", f.read(16), 8)[0]
    patch(overlay, offset, "10s", b"base.qcow\n")
    proc = run_cli("info", "--backing-chain", overlay)
    assert_one_line_error(proc)
    assert "backing file 'base.qcow\\n' not found (looked for " in proc.stderr
    assert proc.stderr.rstrip("\n").endswith("base.qcow\\n)")


def test_backing_chain_loops_are_refused(tmp_path):
    a = make(tmp_path / "a.qcow2", data=False)
    make(tmp_path / "b.qcow2", data=False, backing_file="a.qcow2", backing_format="qcow2")
    # Point a at b by hand: a -> b -> a.
    with open(a, "r+b") as f:
        f.seek(0)
        head = bytearray(f.read(CS))
    name = b"b.qcow2"
    struct.pack_into(">QI", head, 8, 1024, len(name))
    head[1024 : 1024 + len(name)] = name
    with open(a, "r+b") as f:
        f.write(head)
    before = digest(a)
    with pytest.raises(CorruptImageError, match="loops"):
        open_image(a)
    proc = run_cli("info", "--backing-chain", a)
    assert_one_line_error(proc)
    assert "loops" in proc.stderr
    assert digest(a) == before
    # And an image naming itself.
    name = b"a.qcow2"
    head[1024 : 1024 + len(name)] = name
    with open(a, "r+b") as f:
        f.write(head)
    with pytest.raises(CorruptImageError, match="loops"):
        open_image(a)


def test_creating_an_image_over_its_own_backing_file_is_refused(tmp_path):
    make(tmp_path / "a.qcow2", data=False)
    with pytest.raises(PyvmmError, match="its own backing file"):
        create_image(str(tmp_path / "a.qcow2"), "qcow2", None, backing_file="a.qcow2")


def test_missing_backing_file_is_a_clear_error(tmp_path):
    a = make(tmp_path / "a.qcow2", data=False)
    make(tmp_path / "b.qcow2", data=False, backing_file="a.qcow2", backing_format="qcow2")
    (tmp_path / "a.qcow2").unlink()
    with pytest.raises(PyvmmError, match="backing file 'a.qcow2' not found"):
        open_image(str(tmp_path / "b.qcow2"))
    del a


def test_corrupt_bit_allows_reading_but_not_writing(tmp_path):
    path = make(tmp_path / "a.qcow2")
    patch(path, 72, ">Q", INCOMPAT_CORRUPT)
    before = digest(path)
    with open_image(path) as image:
        assert image.read(0, 4) == b"\x5a" * 4
    with pytest.raises(CorruptImageError, match="marked corrupt"):
        open_image(path, readonly=False)
    assert digest(path) == before
    proc = run_cli("check", "-r", "all", path)  # repair clears the bit
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open_image(path, readonly=False) as image:
        image.write(0, b"ok")


def test_dirty_bit_makes_a_writer_rebuild_the_refcounts(tmp_path):
    path = make(tmp_path / "a.qcow2")
    # A writer with lazy refcounts died: the data cluster's refcount never got written.
    with open_image(path, backing=False) as image:
        host = image._l2_entry(0) & 0x00FF_FFFF_FFFF_FE00
        refblock = image._reftable[0]
    patch(path, refblock + 2 * (host // CS), ">H", 0)
    patch(path, 72, ">Q", INCOMPAT_DIRTY)
    with open_image(path, backing=False) as image:
        assert image.header.dirty
        assert check_qcow2(image).corruptions >= 1
    with open_image(path, readonly=False) as image:
        assert not image.header.dirty
        image.write(5 * CS, b"after")
    with open_image(path, backing=False) as image:
        result = check_qcow2(image)
        assert (result.corruptions, result.leaks) == (0, 0)
        assert image.read(0, 2) == b"\x5a\x5a"


def test_not_an_image_at_all(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    # Once as a real process, as the user runs it.
    proc = subprocess.run([sys.executable, "-m", "vmm", "img", "info", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc)
    proc = run_cli("info", str(tmp_path / "missing.qcow2"))
    assert_one_line_error(proc)
    assert "No such file" in proc.stderr
