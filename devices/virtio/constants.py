"""Numbers from the virtio 1.x specification shared by the transport and the devices."""

# Device status bits (virtio 1.x, 2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64

# Reserved feature bits (6): what the transport and queues offer on behalf of every device.
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32

# Device IDs (5).
DEVICE_NET = 1
DEVICE_BLOCK = 2
DEVICE_CONSOLE = 3
DEVICE_RNG = 4
DEVICE_FS = 26

# InterruptStatus bits of virtio-mmio.
INTERRUPT_VRING = 1
INTERRUPT_CONFIG = 2


def bit(n: int) -> int:
    return 1 << n

# virtio-blk: the length of the device ID (its serial) returned by GET_ID.
BLK_ID_BYTES = 20
# virtio-fs: the length of the tag in the configuration space.
FS_TAG_BYTES = 36
