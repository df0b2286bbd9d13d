"""Disk-image benchmark: pyvmm's image library beside qemu-img, measured in the same run.

    python bench/bench_img.py

Figures (one line each, with qemu-img's figure on the same files and the
ratio, as bench/report.py prints it):

  - convert raw -> qcow2 of a 1 GiB sparse image with random data in a
    quarter of its 64 KiB clusters, and the result back qcow2 -> raw
    (qemu-img convert -t writeback, so both flush the output at the end);
  - 4 KiB reads and writes at scattered offsets through the library
    (qemu-img bench, queue depth 1, the same offset sequence: each request
    `step` bytes after the last, modulo the image size minus the request
    size, as qemu-img bench computes it), on copies of the converted qcow2.

Everything lives in a temporary directory that is removed at the end.
PYVMM_BENCH_IMG_MB changes the image's size (default 1024) and
PYVMM_BENCH_IMG_READS the number of reads (default 20000; half as many
writes), for a quick run.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import figure  # noqa: E402
from vmm.image.convert import convert  # noqa: E402
from vmm.image.open import open_image  # noqa: E402

MiB = 1 << 20
CLUSTER = 65536
IMAGE_MB = int(os.environ.get("PYVMM_BENCH_IMG_MB", "1024"))
IMAGE_SIZE = IMAGE_MB * MiB
SIZE = f"{IMAGE_MB // 1024} GiB" if IMAGE_MB % 1024 == 0 else f"{IMAGE_MB} MiB"
REQUEST = 4096
STEP = REQUEST * 7919  # coprime with the number of 4 KiB blocks: visits them all, scattered
READS = int(os.environ.get("PYVMM_BENCH_IMG_READS", "20000"))
WRITES = READS // 2


def make_source(path: Path) -> None:
    """A sparse raw file with random data in a random quarter of its clusters."""
    clusters = IMAGE_SIZE // CLUSTER
    chosen = sorted(random.Random(42).sample(range(clusters), clusters // 4))
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for index in chosen:
            f.seek(index * CLUSTER)
            f.write(os.urandom(CLUSTER))


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def qemu(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def offsets(count: int):
    offset = 0
    for _ in range(count):
        yield offset
        offset = (offset + STEP) % (IMAGE_SIZE - REQUEST)


def pyvmm_reads(path: Path) -> None:
    with open_image(str(path), "qcow2") as image:
        for offset in offsets(READS):
            image.read(offset, REQUEST)


def pyvmm_writes(path: Path) -> None:
    data = os.urandom(REQUEST)
    with open_image(str(path), "qcow2", readonly=False) as image:
        for offset in offsets(WRITES):
            image.write(offset, data)
        image.flush()


def report(what: str, ours: float, theirs: float | None, ops: int | None = None) -> None:
    """A time (seconds) or, given `ops`, a rate (ops/s), beside qemu-img's on the same files."""
    missing = "" if theirs is not None else "apt-get install qemu-utils"
    if ops:
        figure(what, "ops/s", ops / ours, "qemu-img", ops / theirs if theirs else None,
               lower_is_better=False, missing=missing)
    else:
        figure(what, "s", ours, "qemu-img", theirs, missing=missing)


def main() -> None:
    have_qemu = shutil.which("qemu-img") is not None
    with tempfile.TemporaryDirectory(prefix="bench_img.") as tmp:
        d = Path(tmp)
        make_source(d / "src.raw")

        ours = timed(lambda: convert(str(d / "src.raw"), "raw", str(d / "py.qcow2"), "qcow2"))
        theirs = timed(lambda: qemu("convert", "-t", "writeback", "-f", "raw", "-O", "qcow2",
                                    str(d / "src.raw"), str(d / "q.qcow2"))) if have_qemu else None
        report(f"convert raw->qcow2, {SIZE}, 1/4 of clusters hold data", ours, theirs)

        source = d / ("q.qcow2" if have_qemu else "py.qcow2")
        ours = timed(lambda: convert(str(source), "qcow2", str(d / "py.raw"), "raw"))
        theirs = timed(lambda: qemu("convert", "-t", "writeback", "-f", "qcow2", "-O", "raw",
                                    str(source), str(d / "q.raw"))) if have_qemu else None
        report("convert qcow2->raw, same image", ours, theirs)
        for name in ("py.raw", "q.raw", "src.raw", "py.qcow2"):
            (d / name).unlink(missing_ok=True)

        ours = timed(lambda: pyvmm_reads(source))
        theirs = timed(lambda: qemu("bench", "-f", "qcow2", "-t", "writeback", "-d", "1",
                                    "-c", str(READS), "-s", str(REQUEST), "-S", str(STEP),
                                    str(source))) if have_qemu else None
        report(f"4 KiB scattered reads, qcow2 ({READS} requests)", ours, theirs, ops=READS)

        shutil.copyfile(source, d / "w1.qcow2")
        ours = timed(lambda: pyvmm_writes(d / "w1.qcow2"))
        (d / "w1.qcow2").unlink()
        if have_qemu:
            shutil.copyfile(source, d / "w2.qcow2")
            theirs = timed(lambda: qemu("bench", "-w", "-f", "qcow2", "-t", "writeback", "-d", "1",
                                        "-c", str(WRITES), "-s", str(REQUEST), "-S", str(STEP),
                                        f"--flush-interval={WRITES}", str(d / "w2.qcow2")))
        report(f"4 KiB scattered writes, qcow2, flush at the end ({WRITES} requests)", ours,
               theirs if have_qemu else None, ops=WRITES)


if __name__ == "__main__":
    main()
