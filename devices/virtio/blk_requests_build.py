"""Builds virtio-blk's compiled request path, `devices.virtio._blk_requests`, from blk_requests.c.

Run at install time: `make install` runs `python -m devices.virtio.blk_requests_build`,
and `pip install` builds it through setup.py. A host without a C compiler or
Python's headers gets no module, is told so in one line, and virtio-blk
carries every request out in Python (blk_requests.py says which runs, and why
both exist).
"""

from __future__ import annotations

from pathlib import Path

from vmm import compiled_module

MODULE = "devices.virtio._blk_requests"
SOURCE = Path(__file__).with_name("blk_requests.c")

# What Python sees of blk_requests.c.
DECLARATIONS = """
#define BLK_DRAINED 0
#define BLK_PYTHON 1
#define BLK_FULL 2
#define BLK_REQUESTS_DIGEST ...

struct blk_region { uint64_t guest, size; uint8_t *host; };
struct blk_device {
    const struct blk_region *regions;
    uint32_t region_count;
    int fd;
    uint8_t readonly;
    uint64_t capacity;
    uint64_t max_transfer;
};
struct blk_queue {
    uint64_t desc, avail, used;
    uint16_t size, last_avail, used_idx;
    uint8_t event_idx, indirect;
};
struct blk_written {
    uint64_t *pairs;
    uint32_t capacity, count;
    void (*wrote)(void *context, uint64_t start, uint64_t end);
    void *context;
    const uint64_t *starts;
};

int blk_drain(const struct blk_device *dev, struct blk_queue *q, struct blk_written *written,
              uint32_t *completed);
"""


def source_digest() -> int | None:
    return compiled_module.source_digest(SOURCE, DECLARATIONS)


def builder():
    return compiled_module.builder(MODULE, SOURCE, DECLARATIONS, "BLK_REQUESTS_DIGEST")


def build() -> bool:
    """Compile the module next to this file; False (and one line on stderr) when this host cannot."""
    return compiled_module.build(builder(), SOURCE, "virtio-blk's compiled request path",
                                 "the Python one")


if __name__ == "__main__":
    build()
