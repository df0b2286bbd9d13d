"""What a virtio device type implements, and what the transport offers it.

A device type (block, network, ...) says what it is (`device_id`, queue
sizes, feature bits, configuration space) and does the work of its queues.
It never touches registers or interrupt lines: the transport
(devices/virtio/mmio.py) negotiates, programs the queues, and calls

    activate()              the driver set DRIVER_OK; queues and features are final
    queue_notify(index)     the driver made buffers available on a queue
    reset()                 the driver (or the device's own error) reset it

always with the transport's lock held, so a device needs no locking of its
own for those. Work a device starts itself (a packet arriving from the host,
console input) goes through `transport.run_locked(...)`, which takes the same
lock and turns a broken queue into NEEDS_RESET.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devices.virtio.mmio import VirtioMmioTransport


class VirtioDevice:
    device_id: int = 0
    name: str = "virtio"
    queue_max_sizes: tuple[int, ...] = ()

    transport: VirtioMmioTransport | None = None

    def attach(self, transport: VirtioMmioTransport) -> None:
        self.transport = transport

    def features(self) -> int:
        """Device-type feature bits offered (the transport adds the ring and version bits)."""
        return 0

    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it from offset 0x100."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; most devices have nothing writable."""

    def activate(self) -> None:
        """DRIVER_OK: the queues and `transport.driver_features` are final."""

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue `index`."""

    def reset(self) -> None:
        """Back to the state before the driver found the device (queues are reset by the transport)."""

    def close(self) -> None:
        """Release host resources (files, sockets) when the machine stops."""

    # -- helpers -------------------------------------------------------------------

    @property
    def memory(self):
        return self.transport.memory

    def queue(self, index: int):
        return self.transport.queues[index]

    def negotiated(self, feature_bit: int) -> bool:
        return bool(self.transport.driver_features >> feature_bit & 1)
