"""An interrupt line through a KVM irqfd: every write to the eventfd is an edge, with no exit.

The virtio-mmio transport signals edges only (devices/virtio/mmio.py says
when), so the line needs no state and no resample eventfd: KVM raises and
lowers the GSI inside the kernel when the I/O thread writes the eventfd.
"""

from __future__ import annotations

import os


class IrqfdLine:
    def __init__(self, eventfd: int) -> None:
        self.eventfd = eventfd

    def pulse(self) -> None:
        try:
            os.eventfd_write(self.eventfd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: KVM has an edge to deliver anyway

    def set_level(self, high: bool) -> None:
        # An irqfd without resampling cannot hold a line; a rising edge is the best it can do.
        if high:
            self.pulse()
