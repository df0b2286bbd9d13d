"""Kill a writer at random moments: qemu-img check finds no corruption, flushed writes are there."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.image.kill_writer import SLOT, slot_content, workload
from vmm.image.open import create_image, open_image
from vmm.image.qcow2_check import check_qcow2
from vmm.image.qcow2_create import parse_qcow2_options

REPO = Path(__file__).resolve().parents[2]

# (qcow2 options, slots, over a backing file?)
SETUPS = {
    "4k clusters (partial-cluster COW)": ("cluster_size=4096", 4096, False),
    "512-byte clusters (refcount table grows)": ("cluster_size=512", 16384, False),
    "overlay on a raw backing file": ("", 4096, True),
    "version 2, 2k clusters": ("compat=0.10,cluster_size=2048", 4096, False),
    "1-bit refcounts": ("cluster_size=4096,refcount_bits=1", 4096, False),
}


def base_content(slot: int) -> bytes:
    return struct.pack(">4sI", b"BASE", slot) * (SLOT // 8)


def decode(data: bytes, slot: int, with_backing: bool) -> str | int:
    """Which state a slot is in: "zero", "base", or the index of the write that filled it."""
    if data == bytes(SLOT):
        return "zero"
    if with_backing and data == base_content(slot):
        return "base"
    index = struct.unpack_from(">I", data)[0] - 1
    if index >= 0 and data == slot_content(index, slot):
        return index
    raise AssertionError(f"slot {slot} holds garbage: {data[:16].hex()}...")


def allowed_states(seed, slots, flushed, with_backing):
    """Per slot: the state after the last flushed operation, plus anything written later."""
    initial = "base" if with_backing else "zero"
    settled = [initial] * slots
    later: list[set] = [set() for _ in range(slots)]
    for index, kind, slot, count, _ in workload(seed, slots):
        for s in range(slot, slot + count):
            state = "zero" if kind == "zero" else index
            if index <= flushed:
                settled[s] = state
            else:
                later[s].add(state)
    return settled, later


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_killed_writer_leaves_a_consistent_image(tmp_path, qemu, setup):
    options, slots, with_backing = SETUPS[setup]
    rnd = random.Random(setup)
    for trial in range(2):
        seed = rnd.randrange(1 << 30)
        path = tmp_path / f"disk{trial}.qcow2"
        kwargs = {}
        if with_backing:
            base = tmp_path / "base.raw"
            base.write_bytes(b"".join(base_content(s) for s in range(slots)))
            kwargs = {"backing_file": "base.raw", "backing_format": "raw"}
        create_image(str(path), "qcow2", slots * SLOT, options=parse_qcow2_options(options),
                     **kwargs)
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.image.kill_writer", str(path), str(seed), str(slots)],
            cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 0.6))
        os.kill(writer.pid, signal.SIGKILL)
        output = writer.communicate()[0].split()
        writer.wait()
        flushed = max((int(n) for w, n in zip(output, output[1:], strict=False)
                       if w == "flushed"), default=-1)

        result = qemu("qemu-img", "check", path, check=False)
        assert result.returncode in (0, 3), result.stdout + result.stderr  # leaks at most
        assert "ERROR" not in result.stderr
        with open_image(str(path), backing=False) as image:
            assert check_qcow2(image).corruptions == 0
        flat = tmp_path / "flat.raw"
        qemu("qemu-img", "convert", "-O", "raw", path, flat)
        data = flat.read_bytes()
        with open_image(str(path)) as image:
            assert image.read(0, image.size) == data
        settled, later = allowed_states(seed, slots, flushed, with_backing)
        for slot in range(slots):
            state = decode(data[slot * SLOT : (slot + 1) * SLOT], slot, with_backing)
            assert state == settled[slot] or state in later[slot], (
                f"slot {slot}: found {state}, flushed state {settled[slot]} (flushed up to "
                f"op {flushed})")
        flat.unlink()
