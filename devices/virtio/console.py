"""virtio-console (virtio 1.x, 5.3): one port, which Linux makes the hvc0 terminal.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq)
guest output to the host. No multiport, no console size: the driver then
treats the single port as a console, registers hvc0, and a `console=hvc0`
kernel parameter or a getty on /dev/hvc0 uses it.

Output goes to an injected writer (the host console). Input arrives through
`receive(data) -> bytes taken`, the callback the host console
(vmm/console.py) delivers to: whatever the guest has no buffers for stays
with the console, which tries again when `room_available` is called, which
this device does whenever the guest posts receive buffers.

Input is held back until the guest has written to the port once. Linux's
driver posts its receive buffers before the port is registered, and input
that arrives in that window is thrown away (in_intr() finds no port and
flushes the buffers); a port the guest has written to is registered.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from devices.virtio import constants as c
from devices.virtio.device import Activation, VirtioDevice

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 128
# Guest output per chain that the VMM reads at most (Linux sends a page or less).
MAX_OUTPUT = 1 << 20


class VirtioConsole(VirtioDevice):
    device_id = c.DEVICE_CONSOLE
    name = "virtio-console"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, writer: Callable[[bytes], object],
                 room_available: Callable[[], object] = lambda: None) -> None:
        self.writer = writer
        self.room_available = room_available
        self.guest_has_written = False

    def config(self) -> bytes:
        # cols, rows (only with VIRTIO_CONSOLE_F_SIZE), max_nr_ports (with MULTIPORT), emerg_write.
        return struct.pack("<HHII", 0, 0, 1, 0)

    def activate(self, activation: Activation) -> None:
        super().activate(activation)
        self.room_available()

    def reset(self) -> None:
        self.guest_has_written = False

    def queue_notify(self, index: int) -> None:
        if index == RECEIVE_QUEUE:
            self.room_available()  # new receive buffers: the host console may deliver again
            return
        queue = self.queue(TRANSMIT_QUEUE)
        while (chain := queue.pop()) is not None:
            data = chain.read(self.memory, 0, min(chain.readable_length, MAX_OUTPUT))
            queue.push(chain, 0)
            if data:
                self.writer(data)
                if not self.guest_has_written:
                    self.guest_has_written = True
                    self.room_available()  # input held back so far can go now
        self.used_buffers(queue)

    def receive(self, data: bytes) -> int:
        """Host input for the guest (any thread); returns how many bytes the guest took."""
        return self.run_locked(self._fill_receive_buffers, data, default=0)

    def _fill_receive_buffers(self, data: bytes) -> int:
        queue = self.queue(RECEIVE_QUEUE)
        if not queue.ready or not self.guest_has_written:
            return 0
        taken = 0
        while taken < len(data) and (chain := queue.pop()) is not None:
            written = chain.write(self.memory, memoryview(data)[taken:])
            queue.push(chain, written)
            taken += written
        self.used_buffers(queue)
        return taken
