"""virtio-net (virtio 1.x, 5.1): one receive and one transmit queue, packets to a host backend.

Every packet on either queue starts with the 12-byte `virtio_net_hdr_v1`
(checksum and segmentation offload information); the backend
(devices/virtio/net_backends.py) takes and gives packets in that form.
No mergeable receive buffers: Linux then posts buffers big enough for a
whole packet (64 KiB chains when it accepted TSO), and each received
packet fills exactly one chain.

Receive is driven from the host: the backend's `ready()` runs on the I/O
thread, which fills the guest's receive buffers until either runs out. With
no buffers left the backend is paused; the guest's next receive-queue
notification resumes it.
"""

from __future__ import annotations

import logging
import os

from devices.log_once import LogOnce
from devices.virtio import constants as c
from devices.virtio.device import Activation, RunLocked, VirtioDevice
from devices.virtio.net_backends import MAX_FRAME, NET_HEADER_SIZE, NetBackend

log = logging.getLogger(__name__)

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 256
F_MAC = 5


def random_mac() -> bytes:
    # QEMU's prefix, so the address reads as a virtual NIC; random low half so
    # two guests joined by a socket do not collide.
    return bytes([0x52, 0x54, 0x00]) + os.urandom(3)


class VirtioNet(VirtioDevice):
    device_id = c.DEVICE_NET
    name = "virtio-net"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: NetBackend, mac: bytes | None = None, loop=None) -> None:
        self.backend = backend
        self.mac = mac or random_mac()
        self.loop = loop
        self._pending: bytes | None = None  # a received packet waiting for a receive buffer
        self._odd = LogOnce(log, "virtio-net")
        self.rx_packets = self.tx_packets = self.rx_dropped = 0

    def connect(self, run_locked: RunLocked) -> None:
        super().connect(run_locked)
        if self.loop is not None:
            self.backend.start(self.loop, self._backend_ready)

    def features(self) -> int:
        return (1 << F_MAC) | self.backend.offload_features

    def config(self) -> bytes:
        # mac[6], then status (meaningful only with VIRTIO_NET_F_STATUS).
        return self.mac + bytes(2)

    def activate(self, activation: Activation) -> None:
        super().activate(activation)
        self.backend.set_offloads(activation.driver_features)
        self.backend.resume_receive()

    def reset(self) -> None:
        self.backend.pause_receive()
        self.backend.set_offloads(0)
        self._pending = None

    def queue_notify(self, index: int) -> None:
        if index == TRANSMIT_QUEUE:
            self._transmit()
        elif index == RECEIVE_QUEUE:
            self._receive()

    # -- guest to host -------------------------------------------------------------

    def _transmit(self) -> None:
        queue = self.queue(TRANSMIT_QUEUE)
        while (chain := queue.pop()) is not None:
            length = chain.readable_length
            if NET_HEADER_SIZE < length <= NET_HEADER_SIZE + MAX_FRAME:
                self.backend.send(chain.read(self.memory))
                self.tx_packets += 1
            else:
                self._odd("tx-length", "transmit chain of %d bytes dropped", length)
            queue.push(chain, 0)
        self.used_buffers(queue)

    # -- host to guest --------------------------------------------------------------

    def _backend_ready(self) -> None:
        """On the I/O thread: the backend may have packets."""
        # Not active: pause; activate() after the next reset resumes.
        self.run_locked(self._receive, inactive=self.backend.pause_receive)

    def _receive(self) -> None:
        queue = self.queue(RECEIVE_QUEUE)
        if not queue.ready:
            return
        delivered = False
        while True:
            packet = self._pending if self._pending is not None else self.backend.receive()
            if packet is None:
                self.backend.resume_receive()
                break
            chain = queue.pop()
            if chain is None:
                self._pending = packet
                self.backend.pause_receive()
                break
            self._pending = None
            if len(packet) > chain.writable_length:
                # The guest gave a buffer smaller than the offloads it accepted
                # allow; it sees a zero-length (dropped) packet.
                self._odd("rx-too-big", "%d-byte packet does not fit a %d-byte receive buffer",
                          len(packet), chain.writable_length)
                self.rx_dropped += 1
                queue.push(chain, 0)
            else:
                queue.push(chain, chain.write(self.memory, packet))
                self.rx_packets += 1
            delivered = True
        if delivered:
            self.used_buffers(queue)

    def close(self) -> None:
        self.backend.close()
