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

The transmit queue's used-buffer interrupt is decided late. Linux's hvc
write (__send_to_port) kicks the queue and then, with interrupts disabled,
polls for the buffer until the device has used it, reclaiming it itself; its
used_event still asks for an interrupt for that buffer (virtqueue_get_buf
sets used_event to the next entry after every buffer it takes), so the
virtio rule (interrupt when the used index passes used_event) gives one
interrupt per write, which always finds the buffer gone: the handler reports
IRQ_NONE, and after 100,000 of those Linux disables the device's interrupt
("nobody cared"), taking console input with it. So the decision waits until
the queue has been quiet for TRANSMIT_INTERRUPT_DELAY and then reads
used_event afresh: a driver that reclaimed its buffers has moved used_event
past them and gets no interrupt; one that waits for the interrupt still gets
it, that much later. The device reads used_event when it likes (the driver
cannot tell a late read from a slow device), so this keeps the rule.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from devices.virtio import constants as c
from devices.virtio.device import Activation, VirtioDevice
from devices.virtio.io_loop import IoLoop

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 128
# Guest output per chain that the VMM reads at most (Linux sends a page or less).
MAX_OUTPUT = 1 << 20
# How long the transmit queue must be quiet before the device decides whether the
# driver still wants an interrupt for what it sent (see above): far longer than a
# driver's polling takes, short enough for a driver that waits for the interrupt.
TRANSMIT_INTERRUPT_DELAY = 0.01


class VirtioConsole(VirtioDevice):
    device_id = c.DEVICE_CONSOLE
    name = "virtio-console"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, writer: Callable[[bytes], object], loop: IoLoop,
                 room_available: Callable[[], object] = lambda: None) -> None:
        """`loop`: the I/O thread, which decides the transmit queue's interrupts."""
        self.writer = writer
        self.loop = loop
        self.room_available = room_available
        self.guest_has_written = False
        self._transmit_decision_armed = False  # a decision is due on the I/O thread
        self._transmit_quiet_at = 0.0  # when the transmit queue will have been quiet long enough

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
        self._decide_transmit_interrupt_later()

    def _decide_transmit_interrupt_later(self) -> None:
        self._transmit_quiet_at = self.loop.time() + TRANSMIT_INTERRUPT_DELAY
        if not self._transmit_decision_armed:
            self._transmit_decision_armed = True
            self.loop.call_later(TRANSMIT_INTERRUPT_DELAY, self._transmit_decision_due)

    def _transmit_decision_due(self) -> None:
        """On the I/O thread: decide, or wait on while the driver is still sending."""
        # Not waiting for the lock: its holder may be a vCPU sending, blocked until the host
        # reads its output, and the I/O thread has other devices to serve meanwhile.
        ran = self.run_locked(self._decide_transmit_interrupt, inactive=self._disarm_transmit_decision,
                              wait=False)
        if ran is None and self._transmit_decision_armed:  # the device is busy: not quiet yet
            self.loop.call_later(TRANSMIT_INTERRUPT_DELAY, self._transmit_decision_due)

    def _decide_transmit_interrupt(self) -> bool:
        still_busy = self._transmit_quiet_at - self.loop.time()
        if still_busy > 0:
            self.loop.call_later(still_busy, self._transmit_decision_due)
        else:
            self._disarm_transmit_decision()
            self.used_buffers(self.queue(TRANSMIT_QUEUE))  # interrupts only if used_event still asks
        return True  # ran (run_locked gives None when it did not)

    def _disarm_transmit_decision(self) -> None:
        self._transmit_decision_armed = False

    def receive(self, data: bytes) -> int:
        """Host input for the guest (any thread); returns how many bytes the guest took."""
        return self.run_locked(self._fill_receive_buffers, data, default=0)

    def takes_input(self) -> bool:
        """Whether the guest's driver has the port up, so that input reaches it (any thread)."""
        return bool(self.run_locked(self._port_up, default=False))

    def _port_up(self) -> bool:
        return self.guest_has_written and self.queue(RECEIVE_QUEUE).ready

    def _fill_receive_buffers(self, data: bytes) -> int:
        if not self._port_up():
            return 0
        queue = self.queue(RECEIVE_QUEUE)
        taken = 0
        while taken < len(data) and (chain := queue.pop()) is not None:
            written = chain.write(self.memory, memoryview(data)[taken:])
            queue.push(chain, written)
            taken += written
        self.used_buffers(queue)
        return taken
