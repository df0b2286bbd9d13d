"""Mutated qcow2 images through `pyvmm img info/check/convert` and through a virtio-blk disk.

Seed images (plain v3, v2, small clusters, compressed, an overlay on a base)
are made by pyvmm; each case copies one, damages it where it hurts (header
fields, L1/L2 entries, refcount table and blocks, the backing file name,
random bytes, truncation) and runs the commands a user would on it, then
attaches it to a virtio-blk device and reads and writes through the queue.

Pass: no exception escapes (a traceback for the user), no command runs past
its bound, every failure is one line on stderr, a failed convert leaves no
output, and nothing but the image being written changes on the host (the
case directory is hashed before and after; backing images are only read).
Seeded (tests/fuzzing.py): `make fuzz` runs many more cases.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from devices.virtio import blk
from devices.virtio.blk import VirtioBlock
from tests.fuzzing import fuzz_cases, time_bound
from tests.unit.virtio_driver import BlkDriver
from vmm.cli import cli
from vmm.errors import PyvmmError
from vmm.image.open import open_image

MiB = 1 << 20
SUITE_CASES = 40
COMMAND_BOUND = 20.0  # seconds; the commands take milliseconds on images this small

# Header fields: (offset, size) of the qcow2 header (qcow2.txt).
HEADER_FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
                 (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1)]
HOSTILE_BACKING_NAMES = [b"ba\0e.qcow2", b"/dev/null", b"/dev/zero", b".", b"..", b"/", b"overlay.qcow2",
                         b"../base.qcow2", b"/nonexistent/base", b"\xff\xfe", b"b" * 1023, b"base.qcow2\n"]


def run_img(*args: str):
    result = CliRunner().invoke(cli, ["img", *args])
    return result


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, list[Path]]:
    """Seed images by name: [image] or [overlay, base]."""
    root = tmp_path_factory.mktemp("qcow2-seeds")
    raw = root / "data.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(MiB) + b"\x5a" * 65536)
    made = {}
    for name, options in (("v3", []), ("v2", ["-o", "compat=0.10"]), ("small", ["-o", "cluster_size=512"])):
        assert run_img("convert", "-O", "qcow2", *options, str(raw), str(root / f"{name}.qcow2")).exit_code == 0
        made[name] = [root / f"{name}.qcow2"]
    assert run_img("convert", "-c", "-O", "qcow2", str(raw), str(root / "compressed.qcow2")).exit_code == 0
    made["compressed"] = [root / "compressed.qcow2"]
    (root / "chain").mkdir()
    shutil.copy(root / "v3.qcow2", root / "chain" / "base.qcow2")
    overlay = root / "chain" / "overlay.qcow2"
    assert run_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay)).exit_code == 0
    with open_image(str(overlay), readonly=False) as image:
        image.write(65536, b"\xa5" * 4096)
    made["overlay"] = [overlay, root / "chain" / "base.qcow2"]
    return made


def _u(data: bytearray, offset: int, size: int) -> int:
    return int.from_bytes(data[offset:offset + size], "big") if offset + size <= len(data) else 0


def _interesting(rng, size: int, file_size: int) -> int:
    choices = [0, 1, 0x7F, 0x80, 0xFF, 0x200, 0x10000, file_size, file_size + 512, file_size - 1,
               (1 << (8 * size)) - 1, 1 << (8 * size - 1), rng.getrandbits(8 * size),
               rng.randrange(0, max(file_size, 1)) & ~0x1FF]
    return rng.choice(choices) & ((1 << (8 * size)) - 1)


def _write(data: bytearray, offset: int, size: int, value: int) -> None:
    if 0 <= offset and offset + size <= len(data):
        data[offset:offset + size] = value.to_bytes(size, "big")


def mutate(data: bytearray, rng) -> list[str]:
    """Damage the image in 1-3 places; returns what was done (for the failure message)."""
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["header", "l1", "l2", "refcount_table", "refcount_block", "backing", "bytes", "truncate"])
        size = len(data)
        cluster = 1 << min(max(_u(data, 20, 4), 9), 21)
        l1 = _u(data, 40, 8)
        reftable = _u(data, 48, 8)
        if kind == "header":
            offset, width = rng.choice(HEADER_FIELDS)
            _write(data, offset, width, _interesting(rng, width, size))
            done.append(f"header field at {offset}")
        elif kind in ("l1", "refcount_table"):
            table = l1 if kind == "l1" else reftable
            entry = table + 8 * rng.randrange(0, 8)
            value = _interesting(rng, 8, size) | rng.choice([0, 1 << 63, 1 << 62])
            _write(data, entry, 8, value)
            done.append(f"{kind} entry at {entry:#x}")
        elif kind == "l2":
            l2 = _u(data, l1, 8) & 0x00FF_FFFF_FFFF_FE00
            entry = l2 + 8 * rng.randrange(0, cluster // 8)
            _write(data, entry, 8, _interesting(rng, 8, size) | rng.choice([0, 1, 1 << 63, 1 << 62]))
            done.append(f"L2 entry at {entry:#x}")
        elif kind == "refcount_block":
            block = _u(data, reftable, 8)
            entry = block + 2 * rng.randrange(0, cluster // 2)
            _write(data, entry, 2, rng.choice([0, 1, 2, 0xFFFF, rng.getrandbits(16)]))
            done.append(f"refcount at {entry:#x}")
        elif kind == "backing":
            name = rng.choice(HOSTILE_BACKING_NAMES)
            offset = _u(data, 8, 8) or 0x200
            if offset + len(name) <= min(size, cluster):
                data[offset:offset + len(name)] = name
                _write(data, 8, 8, offset)
                _write(data, 16, 4, len(name))
            done.append(f"backing name {name[:20]!r}")
        elif kind == "bytes":
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(0, min(size, 4 * cluster))] = rng.getrandbits(8)
            done.append("random bytes")
        else:
            del data[rng.randrange(0, size):]
            done.append(f"truncated to {len(data)}")
    return done


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clean(result, label: str, allowed: set[int]) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{label}: traceback: {result.exception!r}"
    assert result.exit_code in allowed, f"{label}: exit status {result.exit_code}: {result.stderr}"
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyvmm: "), f"{label}: {result.stderr!r}"


def attach_and_use(image_path: Path, rng, label: str) -> None:
    """Open the image as `--disk` does and drive it through virtio-blk requests."""
    try:
        image = open_image(str(image_path), readonly=False)
    except PyvmmError:
        return  # `pyvmm boot --disk` prints it as one line (vmm/cli.py)
    with image:
        if image.size % 512 or image.size == 0:
            return  # --disk refuses these with one line (vmm/virtio_setup.py)
        driver = BlkDriver(VirtioBlock(image))
        sectors = image.size // 512
        for _ in range(8):
            sector = rng.choice([0, rng.randrange(sectors), sectors - 1, sectors, (1 << 64) // 512 - 1])
            if rng.random() < 0.3:
                status = driver.request(blk.T_OUT, sector, out=b"\x3c" * 4096)[0]
            else:
                status = driver.request(blk.T_IN, sector, in_length=4096)[0]
            assert status in (blk.S_OK, blk.S_IOERR), f"{label}: status {status}"
        assert driver.request(blk.T_FLUSH)[0] in (blk.S_OK, blk.S_IOERR), label


def test_mutated_qcow2_images_are_refused_cleanly(seeds, tmp_path):
    names = sorted(seeds)
    for label, rng in fuzz_cases("qcow2", SUITE_CASES):
        case = tmp_path / label.split(" (")[0].replace(" ", "-")
        seed = seeds[rng.choice(names)]
        case.mkdir()
        copies = [case / path.name for path in seed]
        for path, copy in zip(seed, copies, strict=True):
            shutil.copy(path, copy)
        target = rng.choice(copies)  # in a chain, the overlay or its base
        data = bytearray(target.read_bytes())
        damage = mutate(data, rng)
        target.write_bytes(data)
        label = f"{label}: {target.name} with {', '.join(damage)}"
        top = str(copies[0])
        out = tmp_path / "out"
        before = tree_digest(case)
        with time_bound(COMMAND_BOUND, label):
            for args, allowed in ((["info", top], {0, 1}), (["info", "--output=json", "--backing-chain", top], {0, 1}),
                                  (["check", top], {0, 1, 2, 3, 63}), (["check", "--output=json", top], {0, 1, 2, 3, 63}),
                                  (["convert", "-O", "raw", top, str(out)], {0, 1}),
                                  (["convert", "-O", "qcow2", top, str(out)], {0, 1})):
                result = run_img(*args)
                assert_clean(result, f"{label}: img {' '.join(args[:-1])}", allowed)
                assert out.exists() == (args[0] == "convert" and result.exit_code == 0), label
                out.unlink(missing_ok=True)
            assert tree_digest(case) == before, f"{label}: a read-only command changed a file"
            attach_and_use(Path(top), rng, label)
            result = run_img("check", "-r", "all", top)
            assert_clean(result, f"{label}: img check -r all", {0, 1, 2, 3, 63})
        after = tree_digest(case)
        changed = {name for name in before if after.get(name) != before[name]} | (after.keys() - before.keys())
        assert changed <= {copies[0].name}, f"{label}: files other than the image written: {changed}"
        shutil.rmtree(case)
