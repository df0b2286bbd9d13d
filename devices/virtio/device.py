"""What a virtio device type implements, and what it is handed to work with.

A device type (block, network, ...) says what it is (`device_id`, queue
sizes, feature bits, configuration space) and does the work of its queues.
It never touches registers or interrupt lines: the transport
(devices/virtio/mmio.py) negotiates, programs the queues, and calls

    connect(run_locked)     once, when the transport is created
    activate(activation)    the driver set DRIVER_OK: here are guest memory, the
                            programmed queues, the negotiated features and the
                            interrupt (Firecracker's `activate(mem, interrupt)`)
    queue_notify(index)     the driver made buffers available on a queue
    reset()                 the driver (or the device's own error) reset it

always with the transport's lock held, so a device needs no locking of its
own for those. Work a device starts itself (a packet arriving from the host,
console input) goes through `self.run_locked(...)`, which takes the same
lock, runs the work only while the device is active and turns a broken queue
into NEEDS_RESET.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from devices.virtio.queue import Virtqueue
from vmm.memory import GuestMemory

RunLocked = Callable[..., object]


@dataclass(frozen=True)
class Activation:
    """What a device works with from DRIVER_OK until the next reset."""

    memory: GuestMemory
    queues: Sequence[Virtqueue]
    driver_features: int
    # The device put buffers on a queue's used ring: interrupt the driver if it asked for one.
    used_buffers: Callable[[Virtqueue], None]


class VirtioDevice:
    device_id: int = 0
    name: str = "virtio"
    queue_max_sizes: tuple[int, ...] = ()

    activation: Activation | None = None
    _run_locked: RunLocked | None = None

    def connect(self, run_locked: RunLocked) -> None:
        """The transport's `run_locked(work, *args, default=None, inactive=None, wait=True)`,
        for work the device starts itself: runs `work(*args)` under the transport's lock
        if the device is active (else calls `inactive()`, under the lock, and returns
        `default`); with `wait=False` it returns `default` at once if the lock is held."""
        self._run_locked = run_locked

    def features(self) -> int:
        """Device-type feature bits offered (the transport adds the ring and version bits)."""
        return 0

    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it from offset 0x100."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; most devices have nothing writable."""

    def activate(self, activation: Activation) -> None:
        """DRIVER_OK: the queues and features are final. An override calls this first."""
        self.activation = activation

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue `index`."""

    def reset(self) -> None:
        """Back to the state before the driver found the device (queues are reset by the transport)."""

    def close(self) -> None:
        """Release host resources (files, sockets) when the machine stops."""

    # -- for the device types: what activation handed over ---------------------------

    @property
    def memory(self) -> GuestMemory:
        return self.activation.memory

    def queue(self, index: int) -> Virtqueue:
        return self.activation.queues[index]

    def used_buffers(self, queue: Virtqueue) -> None:
        self.activation.used_buffers(queue)

    def run_locked(self, work: Callable[..., object], *args: object, default: object = None,
                   inactive: Callable[[], object] | None = None, wait: bool = True) -> object:
        return self._run_locked(work, *args, default=default, inactive=inactive, wait=wait)
