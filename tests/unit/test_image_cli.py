"""`pyvmm img` as a qemu-img user drives it (no qemu needed), and size parsing."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from vmm.cli import cli
from vmm.errors import PyvmmError
from vmm.image.open import open_image
from vmm.image.sizes import format_size, parse_size

MiB = 1 << 20


def img(*args, expect=0):
    result = CliRunner().invoke(cli, ["img", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == expect, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("1K", 1024), ("1k", 1024), ("10M", 10 * MiB), ("2G", 2 << 30),
    ("1T", 1 << 40), ("1.5G", 3 << 29), ("64b", 64),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "1X", "-1", "1.0000000001K", "1e9", "99999999E"])
def test_parse_size_rejects(text):
    with pytest.raises(PyvmmError):
        parse_size(text)


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (200704, "196 KiB"), (1 << 30, "1 GiB"), (1000 * 1024, "0.977 MiB"),
    (10 * MiB, "10 MiB"), (1536 * MiB, "1.5 GiB"),
])
def test_format_size_like_qemu(value, text):
    assert format_size(value) == text


def test_create_info_and_json_fields(tmp_path):
    path = tmp_path / "disk.qcow2"
    out = img("create", "-f", "qcow2", path, "1G").stdout
    assert out.startswith(f"Formatting '{path}', fmt=qcow2")
    info = json.loads(img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == 1 << 30
    assert info["format"] == "qcow2"
    assert info["cluster-size"] == 65536
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["dirty-flag"] is False
    human = img("info", path).stdout
    assert "virtual size: 1 GiB (1073741824 bytes)" in human
    assert "file format: qcow2" in human


def test_overlay_workflow(tmp_path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    img("create", "-f", "qcow2", base, "64M")
    with open_image(str(base), readonly=False) as image:
        image.write(0, b"base" * 1024)
    img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)  # size from the base
    with open_image(str(top), readonly=False) as image:
        assert image.size == 64 * MiB
        image.write(2, b"TOP")
    info = json.loads(img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    chain = json.loads(img("info", "--output=json", "--backing-chain", top).stdout)
    assert [i["filename"] for i in chain] == [str(top), str(tmp_path / "base.qcow2")]
    assert "No errors were found" in img("check", top).stdout
    raw = tmp_path / "flat.raw"
    img("convert", "-O", "raw", top, raw)
    assert raw.read_bytes()[:8] == b"baTOPase"
    assert "Images are identical." in img("compare", top, raw).stdout


def test_convert_keeps_holes_sparse_and_compresses(tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(os.urandom(MiB))
        f.seek(200 * MiB)
        f.write(b"text" * 65536)
    out = tmp_path / "out.qcow2"
    img("convert", "-f", "raw", "-O", "qcow2", src, out)
    assert os.path.getsize(out) < 3 * MiB
    back = tmp_path / "back.raw"
    img("convert", "-O", "raw", out, back)
    assert os.stat(back).st_blocks * 512 < 3 * MiB
    assert "identical" in img("compare", src, back).stdout
    packed = tmp_path / "packed.qcow2"
    img("convert", "-c", "-O", "qcow2", src, packed)
    assert os.path.getsize(packed) < os.path.getsize(out)
    assert "identical" in img("compare", src, packed).stdout
    report = json.loads(img("check", "--output=json", packed).stdout)
    assert report["compressed-clusters"] > 0


def test_compare_reports_the_first_difference(tmp_path):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(10000))
    b.write_bytes(bytes(7777) + b"x" + bytes(2222))
    assert img("compare", a, b, expect=1).stdout.strip() == "Content mismatch at offset 7777!"
    c = tmp_path / "c.raw"
    c.write_bytes(bytes(20000))
    out = img("compare", a, c).stdout
    assert "Image size mismatch" in out and "identical" in out
    assert img("compare", "-s", a, c, expect=1).stdout
    assert img("compare", a, tmp_path / "missing", expect=2).stderr.startswith("pyvmm: ")


def test_resize_grows_and_refuses_to_shrink_qcow2(tmp_path):
    path = tmp_path / "disk.qcow2"
    img("create", "-f", "qcow2", path, "1M")
    assert img("resize", path, "+1G").stdout.strip() == "Image resized."
    with open_image(str(path)) as image:
        assert image.size == (1 << 30) + MiB
    assert "--shrink" in img("resize", path, "-1M", expect=1).stderr
    assert "not supported" in img("resize", "--shrink", path, "1M", expect=1).stderr
    raw = tmp_path / "disk.raw"
    img("create", raw, "2M")
    img("resize", "--shrink", raw, "1M")
    assert os.path.getsize(raw) == MiB


def test_check_exit_codes(tmp_path):
    path = tmp_path / "disk.qcow2"
    img("create", "-f", "qcow2", path, "16M")
    with open_image(str(path), readonly=False) as image:
        image.write(0, b"x" * 65536)
        leaked = image._alloc_cluster()  # a leak: counted, used by nothing
        image._pwrite(leaked, bytes(65536))
    out = img("check", path, expect=3)
    assert f"Leaked cluster {leaked // 65536} refcount=1 reference=0" in out.stderr
    assert "1 leaked clusters were found" in out.stdout
    report = json.loads(img("check", "--output=json", path, expect=3).stdout)
    assert report["leaks"] == 1
    fixed = img("check", "-r", "leaks", path)
    assert "1 leaked clusters" in fixed.stdout and "No errors were found" in fixed.stdout
    img("check", path)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(512))
    assert "does not support checks" in img("check", raw, expect=63).stderr


def test_qcow2_sizes_round_up_to_whole_sectors(tmp_path):
    img("create", "-f", "qcow2", tmp_path / "x.qcow2", "1000")
    with open_image(str(tmp_path / "x.qcow2")) as image:
        assert image.size == 1024


def test_snapshot_list_of_an_image_without_snapshots_is_empty(tmp_path):
    path = tmp_path / "disk.qcow2"
    img("create", "-f", "qcow2", path, "1M")
    assert img("snapshot", "-l", path).stdout == ""
    assert img("snapshot", path, expect=1).stderr.startswith("pyvmm: ")


@pytest.mark.parametrize("args, message", [
    (["create", "-f", "qcow2", "{d}/x.qcow2", "12Q"], "invalid image size"),
    (["create", "-f", "qcow2", "-o", "cluster_size=3000", "{d}/x.qcow2", "1M"], "cluster size"),
    (["create", "-f", "qcow2", "-o", "bogus=1", "{d}/x.qcow2", "1M"], "unsupported qcow2 option"),
    (["create", "-f", "qcow2", "{d}/x.qcow2"], "image size is needed"),
    (["create", "-f", "qcow2", "-b", "nothere.qcow2", "{d}/x.qcow2"], "nothere.qcow2"),
    (["create", "-f", "raw", "{d}/nodir/x.raw", "1M"], "No such file or directory"),
    (["convert", "-c", "-O", "raw", "{d}/in.raw", "{d}/x.raw"], "compression"),
    (["convert", "-O", "qcow2", "{d}/nothere", "{d}/x.qcow2"], "nothere"),
])
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, args, message):
    (tmp_path / "in.raw").write_bytes(bytes(4096))
    result = img(*[a.format(d=tmp_path) for a in args], expect=1)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("pyvmm: ")
    assert message in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.raw"]  # nothing half-written, no temp files
