"""The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): one register page per device.

    0x000 MagicValue "virt"     0x004 Version (2)        0x008 DeviceID     0x00c VendorID
    0x010 DeviceFeatures        0x014 DeviceFeaturesSel
    0x020 DriverFeatures        0x024 DriverFeaturesSel
    0x030 QueueSel   0x034 QueueNumMax   0x038 QueueNum   0x044 QueueReady   0x050 QueueNotify
    0x060 InterruptStatus       0x064 InterruptACK       0x070 Status
    0x080/0x084 QueueDesc       0x090/0x094 QueueDriver  0x0a0/0x0a4 QueueDevice (low/high)
    0x0b0/0x0b4 SHMLen (all ones: no shared memory)      0x0fc ConfigGeneration
    0x100-      device configuration space

Negotiation: the transport offers the device's features plus VERSION_1,
INDIRECT_DESC and EVENT_IDX. A driver that does not accept VERSION_1 (a
legacy driver) or asks for features that were not offered never sees
FEATURES_OK set, which the specification says makes it give up.

Interrupts are edges (the DSDT says edge-triggered, as Firecracker and
Cloud Hypervisor describe theirs): one for every interrupt the device
raises, even while InterruptStatus is already non-zero, so that an edge the
guest lost (its I/O APIC pin was masked for a moment) costs it nothing once
the next one comes; and one more when an InterruptACK leaves bits set,
because those arrived after the driver read the register. At worst the
guest sees an interrupt with nothing to do, which drivers expect. A held
level line would need the accelerator to tell us about the guest's EOI;
KVM's irqfd resampling does, but kvm_pvm signals it before the guest's
handler has run, and re-asserting then gives the guest a spurious interrupt
every time. A device-fatal error (a malformed queue, a failing device) sets
NEEDS_RESET and, once the driver is running, raises a configuration-change
interrupt.

InterruptStatus and InterruptACK have a lock of their own, innermost: a vCPU
in the guest's interrupt handler must not wait for the I/O thread to finish
a batch of disk requests (which holds the transport's lock) just to read
and acknowledge the status.
Nothing the guest writes here can raise an exception out of `read`/`write`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

from boot.acpi import aml
from devices.log_once import LogOnce
from devices.virtio import constants as c
from devices.virtio.device import Activation, VirtioDevice
from devices.virtio.queue import Virtqueue, VirtqueueError
from vmm.bus import IrqLine
from vmm.layout import IOAPIC_PINS, MMIO_HOLE_START
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"PYVM", "little")

MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

TRANSPORT_FEATURES = (1 << c.F_VERSION_1) | (1 << c.F_INDIRECT_DESC) | (1 << c.F_EVENT_IDX)

_QUEUE_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc_address", 0), QUEUE_DESC_HIGH: ("desc_address", 32),
    QUEUE_DRIVER_LOW: ("driver_address", 0), QUEUE_DRIVER_HIGH: ("driver_address", 32),
    QUEUE_DEVICE_LOW: ("device_address", 0), QUEUE_DEVICE_HIGH: ("device_address", 32),
}


class VirtioMmioTransport:
    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: IrqLine, name: str | None = None) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.name = name or device.name
        self.lock = threading.RLock()
        self._interrupt_lock = threading.Lock()  # InterruptStatus only; taken inside `lock`, never around it
        self.queues = [Virtqueue(memory, index, size) for index, size in enumerate(device.queue_max_sizes)]
        self.device_features = device.features() | TRANSPORT_FEATURES
        self.config_generation = 0
        self.errors = 0  # device-fatal errors (NEEDS_RESET) since the machine started
        self._odd = LogOnce(log, f"virtio-mmio {self.name}")
        self._reset_state()
        device.connect(self.run_locked)

    def _reset_state(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        with self._interrupt_lock:
            self.interrupt_status = 0
        for queue in self.queues:
            queue.reset()

    # -- state the devices ask about -------------------------------------------------

    @property
    def active(self) -> bool:
        """The driver is running the device and nothing has broken it."""
        return self.status & (c.STATUS_DRIVER_OK | c.STATUS_NEEDS_RESET) == c.STATUS_DRIVER_OK

    # -- the register page ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == INTERRUPT_STATUS and size == 4:
            return self.interrupt_status  # one int read: no lock needed, and none waited for
        with self.lock:
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                self._odd("access-size", "%d-byte read at %#x ignored (registers are 32-bit)", size, offset)
                return 0
            return self._read_register(offset) & 0xFFFF_FFFF

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        queue = self._selected_queue()
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue is not None and queue.ready)
        if offset in _QUEUE_ADDRESS_REGISTERS and queue is not None:
            attribute, shift = _QUEUE_ADDRESS_REGISTERS[offset]
            return getattr(queue, attribute) >> shift
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INTERRUPT_ACK and size == 4:
            self._acknowledge(value)
            return
        with self.lock:
            if offset >= CONFIG:
                if self.status & c.STATUS_DRIVER:
                    self._guarded(self.device.write_config, offset - CONFIG, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                self._odd("access-size", "%d-byte write at %#x ignored (registers are 32-bit)", size, offset)
                return
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == STATUS:
            self._write_status(value)
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRESS_REGISTERS:
            self._write_queue_register(offset, value)
        elif offset == SHM_SEL:
            pass  # every region reads as absent (virtio-fs asks for its DAX window)
        else:
            self._odd(f"write-{offset:#x}", "write of %#x to read-only or unknown register %#x ignored",
                      value, offset)

    def _write_driver_features(self, value: int) -> None:
        if self.status & c.STATUS_FEATURES_OK or not self.status & c.STATUS_DRIVER:
            self._odd("late-features", "driver features written outside feature negotiation; ignored")
            return
        if self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _read_config(self, offset: int, size: int) -> int:
        space = self.device.config()
        if offset + size > len(space):
            self._odd("config-range", "config read at %#x+%d beyond the %d-byte space", offset, size, len(space))
            return 0
        return int.from_bytes(space[offset : offset + size], "little")

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self._odd("queue-sel", "queue register %#x written with QueueSel %d beyond the device's %d queues",
                      offset, self.queue_sel, len(self.queues))
            return
        if offset == QUEUE_READY:
            if not value:
                queue.ready = False
            elif not queue.ready:
                if not self.status & c.STATUS_FEATURES_OK:
                    self.device_error(f"queue {queue.index} enabled before feature negotiation")
                    return
                try:
                    queue.activate(event_idx=self._negotiated(c.F_EVENT_IDX),
                                   indirect=self._negotiated(c.F_INDIRECT_DESC))
                except VirtqueueError as err:
                    self.device_error(str(err))
            return
        if queue.ready:
            self._odd("ready-queue", "queue %d reprogrammed while enabled; ignored", queue.index)
            return
        if offset == QUEUE_NUM:
            queue.size = value
            return
        attribute, shift = _QUEUE_ADDRESS_REGISTERS[offset]
        current = getattr(queue, attribute)
        setattr(queue, attribute, (current & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _negotiated(self, feature_bit: int) -> bool:
        return bool(self.driver_features >> feature_bit & 1)

    # -- status and reset ------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        value &= 0xFF
        # The driver may only add bits; NEEDS_RESET is the device's to set.
        value = (value | old) & ~c.STATUS_NEEDS_RESET | (old & c.STATUS_NEEDS_RESET)
        if value & c.STATUS_FEATURES_OK and not old & c.STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~c.STATUS_FEATURES_OK
        if value & c.STATUS_DRIVER_OK and not value & c.STATUS_FEATURES_OK:
            self._odd("driver-ok-early", "DRIVER_OK without FEATURES_OK; device left inactive")
            value &= ~c.STATUS_DRIVER_OK
        self.status = value
        if value & c.STATUS_DRIVER_OK and not old & c.STATUS_DRIVER_OK and not value & c.STATUS_NEEDS_RESET:
            self._guarded(self.device.activate,
                          Activation(self.memory, tuple(self.queues), self.driver_features, self.used_buffers))

    def _features_acceptable(self) -> bool:
        unknown = self.driver_features & ~self.device_features
        if unknown:
            self._odd("features", "driver accepted features %#x that were not offered; FEATURES_OK refused", unknown)
            return False
        if not self._negotiated(c.F_VERSION_1):
            self._odd("legacy", "driver did not accept VIRTIO_F_VERSION_1 (a legacy driver); FEATURES_OK refused")
            return False
        return True

    def reset(self) -> None:
        with self.lock:
            self._guarded(self.device.reset)
            self._reset_state()

    # -- notifications and interrupts ----------------------------------------------------

    def notify(self, index: int) -> None:
        """The driver kicked queue `index` (a QueueNotify write, or its eventfd on KVM)."""
        with self.lock:
            if not self.active:
                return
            if index >= len(self.queues) or not self.queues[index].ready:
                self._odd("notify", "notify for queue %d, which is not enabled", index)
                return
            self._guarded(self.device.queue_notify, index)

    def run_locked(self, work: Callable[..., object], *args: object, default: object = None,
                   inactive: Callable[[], object] | None = None, wait: bool = True) -> object:
        """Run device work that the device started itself (host input), if the device is active.

        Returns what `work` returned, or `default` when the device is not
        active (after calling `inactive()`, still under the lock) or the work
        broke a queue. With `wait=False`, also `default` at once, running
        nothing, when another thread holds the lock.
        """
        if not self.lock.acquire(blocking=wait):
            return default
        try:
            if not self.active:
                if inactive is not None:
                    inactive()
                return default
            return self._guarded(work, *args, default=default)
        finally:
            self.lock.release()

    def _guarded(self, work: Callable[..., object], *args: object, default: object = None) -> object:
        try:
            return work(*args)
        except VirtqueueError as err:
            self.device_error(str(err))
        except Exception as err:  # noqa: BLE001 - a device bug must cost the guest its device, not the VMM
            log.debug("virtio %s failed", self.name, exc_info=True)
            self.device_error(f"internal error: {err!r}")
        return default

    def used_buffers(self, queue: Virtqueue) -> None:
        """The device put buffers on `queue`'s used ring: interrupt if the driver wants it."""
        if queue.should_interrupt():
            self._raise(c.INTERRUPT_VRING)

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & c.STATUS_DRIVER_OK:
                self._raise(c.INTERRUPT_CONFIG)

    def device_error(self, reason: str) -> None:
        """Something device-fatal: set NEEDS_RESET and tell a running driver."""
        with self.lock:
            self.errors += 1
            self._odd("needs-reset", "%s; the device needs a reset", reason)
            if self.status & c.STATUS_NEEDS_RESET:
                return
            self.status |= c.STATUS_NEEDS_RESET
            if self.status & c.STATUS_DRIVER_OK:
                self._raise(c.INTERRUPT_CONFIG)

    def _raise(self, bits: int) -> None:
        with self._interrupt_lock:
            self.interrupt_status |= bits
            self.irq.pulse()

    def _acknowledge(self, bits: int) -> None:
        with self._interrupt_lock:
            self.interrupt_status &= ~bits
            if self.interrupt_status:
                self.irq.pulse()  # bits the handler did not see: it will not look again

    def close(self) -> None:
        with self.lock:
            self.device.close()
            for queue in self.queues:
                queue.reset()  # lets go of its views of guest RAM, which can then be unmapped


# -- where they sit: one window per device from the start of the MMIO hole -----------

WINDOW_SIZE = 0x1000
FIRST_WINDOW = MMIO_HOLE_START
# One GSI each: the I/O APIC pins 16-23 that no ISA device uses (as QEMU's microvm
# does with ACPI), edge-triggered (see above), active high.
FIRST_GSI = 16
MAX_DEVICES = IOAPIC_PINS - FIRST_GSI
MAX_ACPI_NAMES = 0x1000  # device names V000-VFFF


class Window(NamedTuple):
    base: int
    size: int
    gsi: int


def window(index: int) -> Window:
    """Where the `index`th virtio-mmio device sits."""
    return Window(FIRST_WINDOW + index * WINDOW_SIZE, WINDOW_SIZE, FIRST_GSI + index)


def acpi_description(index: int, where: Window) -> bytes:
    """The DSDT entry for a window: `_HID` "LNRO0005", a Memory32Fixed and an Interrupt,
    as QEMU's microvm describes them."""
    if not 0 <= index < MAX_ACPI_NAMES:
        raise ValueError(f"at most {MAX_ACPI_NAMES} virtio-mmio devices in the DSDT")
    return aml.device(
        f"V{index:03X}",
        aml.name("_HID", aml.string("LNRO0005")),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CCA", aml.integer(1)),  # DMA is cache-coherent
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(where.base, where.size),
            aml.interrupt(where.gsi, edge=True),  # edge-triggered, active high: see above
        )),
    )
