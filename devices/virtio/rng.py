"""virtio-rng (virtio 1.x, 5.4): entropy from the host's random source.

One queue of device-writable buffers; each is filled from `os.urandom`
(getrandom(2) on Linux, never blocking once the host pool is initialised).
The guest's hw_random core shows it as /dev/hwrng.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from devices.virtio import constants as c
from devices.virtio.device import VirtioDevice

QUEUE_SIZE = 64
# Bytes per request at most: the Linux driver asks for a page or less; this
# bounds what one hostile request can make the VMM generate.
MAX_REQUEST = 64 << 10


class VirtioRng(VirtioDevice):
    device_id = c.DEVICE_RNG
    name = "virtio-rng"
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self.source = source
        self.bytes_served = 0

    def queue_notify(self, index: int) -> None:
        queue = self.queue(index)
        while (chain := queue.pop()) is not None:
            length = min(chain.writable_length, MAX_REQUEST)
            written = chain.write(self.memory, self.source(length)) if length else 0
            self.bytes_served += written
            queue.push(chain, written)
        self.used_buffers(queue)
