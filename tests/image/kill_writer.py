"""A writer for the kill test: random slot writes and flushes until it is killed.

    python -m tests.image.kill_writer IMAGE SEED SLOTS

Prints "ready" once the image is open and "flushed N" each time a flush of
everything up to operation N has returned. The operations come from
`workload(seed, slots)`, so the test can replay them.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Iterator

SLOT = 1024
MAX_OPS = 20000


def workload(seed: int, slots: int) -> Iterator[tuple[int, str, int, int, bool]]:
    """(op index, "write" or "zero", first slot, slot count, flush after it?)"""
    rnd = random.Random(seed)
    for index in range(MAX_OPS):
        kind = "zero" if rnd.random() < 0.1 else "write"
        count = rnd.randint(1, 3)
        slot = rnd.randrange(slots - count + 1)
        yield index, kind, slot, count, rnd.random() < 0.2


def slot_content(index: int, slot: int) -> bytes:
    """What write number `index` puts in `slot`: recognisable, and tells who wrote it."""
    return struct.pack(">II", index + 1, slot) * (SLOT // 8)


def main() -> None:
    from vmm.image.open import open_image

    path, seed, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    image = open_image(path, readonly=False)
    print("ready", flush=True)
    for index, kind, slot, count, flush in workload(seed, slots):
        if kind == "zero":
            image.write_zeroes(slot * SLOT, count * SLOT)
        else:
            image.write(slot * SLOT, b"".join(slot_content(index, s)
                                              for s in range(slot, slot + count)))
        if flush:
            image.flush()
            print(f"flushed {index}", flush=True)
    image.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
