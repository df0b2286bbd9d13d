"""The virtio-mmio transport: identification, negotiation, queue set-up, interrupts, reset, errors."""

from __future__ import annotations

import threading

from devices.virtio import constants as c
from devices.virtio import mmio as r
from devices.virtio.device import VirtioDevice
from devices.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT
from tests.unit.virtio_driver import Buffer, make_transport


class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable part; records what the transport did."""

    device_id = 42
    name = "echo"
    queue_max_sizes = (16, 8)

    def __init__(self) -> None:
        self.activations = 0
        self.resets = 0
        self.config_writes = []

    def features(self) -> int:
        return 1 << 3

    def config(self) -> bytes:
        return bytes(range(1, 9))

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    def activate(self, activation) -> None:
        super().activate(activation)
        self.activations += 1

    def reset(self) -> None:
        self.resets += 1

    def queue_notify(self, index: int) -> None:
        queue = self.queue(index)
        while (chain := queue.pop()) is not None:
            written = chain.write(self.memory, chain.read(self.memory))
            queue.push(chain, written)
        self.used_buffers(queue)


def setup():
    device = EchoDevice()
    transport, driver, memory, irq = make_transport(device)
    return device, transport, driver, memory, irq


def test_identification_registers():
    _, _, driver, _, _ = setup()
    assert driver.read(r.MAGIC_VALUE) == 0x74726976
    assert driver.read(r.VERSION_REG) == 2
    assert driver.read(r.DEVICE_ID) == 42
    assert driver.read(r.VENDOR_ID_REG) != 0
    offered = driver.device_features()
    assert offered & (1 << c.F_VERSION_1)
    assert offered & (1 << c.F_INDIRECT_DESC) and offered & (1 << c.F_EVENT_IDX)
    assert offered & (1 << 3)
    assert driver.read(r.SHM_LEN_LOW) == driver.read(r.SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_config_space_reads_by_size_and_beyond_the_end():
    _, _, driver, _, _ = setup()
    assert driver.config(0, 1) == 1
    assert driver.config(2, 2) == 0x0403
    assert driver.config(4, 4) == 0x08070605
    assert driver.config(8, 4) == 0  # beyond the 8-byte space


def test_handshake_and_echo_request():
    device, transport, driver, memory, irq = setup()
    queue, _ = driver.start(2)
    assert device.activations == 1
    assert driver.status == c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER | c.STATUS_FEATURES_OK | c.STATUS_DRIVER_OK
    src = driver.heap.alloc(5, data=b"hello")
    dst = driver.heap.alloc(5)
    head = queue.add([Buffer(src, 5), Buffer(dst, 5, writable=True)])
    assert queue.take_used() == [(head, 5)]
    assert memory.read(dst, 5) == b"hello"
    assert irq.edges == 1 and driver.read(r.INTERRUPT_STATUS) == c.INTERRUPT_VRING
    assert driver.ack_interrupt() == c.INTERRUPT_VRING
    assert irq.edges == 1  # everything acknowledged: no further edge


def test_an_edge_per_interrupt_and_one_more_for_bits_the_handler_missed():
    _, transport, driver, _, irq = setup()
    queue, _ = driver.start(2)
    transport.config_changed()
    transport.config_changed()  # an edge each: one lost by the guest must not wedge the device
    assert irq.edges == 2
    seen = driver.read(r.INTERRUPT_STATUS)
    assert seen == c.INTERRUPT_CONFIG
    # A used buffer after the handler read the register: its own edge ...
    src, dst = driver.heap.alloc(1, data=b"x"), driver.heap.alloc(1)
    queue.add([Buffer(src, 1), Buffer(dst, 1, writable=True)])
    assert irq.edges == 3
    # ... and one more when the acknowledgement leaves its bit set.
    driver.write(r.INTERRUPT_ACK, seen)
    assert irq.edges == 4 and driver.read(r.INTERRUPT_STATUS) == c.INTERRUPT_VRING
    driver.write(r.INTERRUPT_ACK, c.INTERRUPT_VRING)
    assert irq.edges == 4 and driver.read(r.INTERRUPT_STATUS) == 0


def test_status_and_acknowledgement_do_not_wait_for_device_work():
    _, transport, driver, _, irq = setup()
    driver.start(2)
    transport.config_changed()
    done = []
    with transport.lock:  # the I/O thread in the middle of a batch of requests
        worker = threading.Thread(target=lambda: done.append(
            (driver.read(r.INTERRUPT_STATUS), driver.write(r.INTERRUPT_ACK, c.INTERRUPT_CONFIG))))
        worker.start()
        worker.join(timeout=5)
        assert done == [(c.INTERRUPT_CONFIG, None)]
    assert driver.read(r.INTERRUPT_STATUS) == 0


def test_driver_without_version_1_is_refused():
    device, _, driver, _, _ = setup()
    legacy = driver.device_features() & ~(1 << c.F_VERSION_1)
    assert not driver.negotiate(accept=legacy)
    assert not driver.status & c.STATUS_FEATURES_OK
    driver.write(r.STATUS, driver.status | c.STATUS_DRIVER_OK)
    assert device.activations == 0


def test_features_not_offered_are_refused():
    _, _, driver, _, _ = setup()
    assert not driver.negotiate(accept=driver.device_features() | (1 << 40))


def test_driver_features_are_frozen_after_features_ok():
    _, transport, driver, _, _ = setup()
    assert driver.negotiate(accept=1 << c.F_VERSION_1)
    driver.write(r.DRIVER_FEATURES_SEL, 0)
    driver.write(r.DRIVER_FEATURES, 1 << c.F_EVENT_IDX)
    assert transport.driver_features == 1 << c.F_VERSION_1


def test_reset_clears_everything_and_tells_the_device():
    device, transport, driver, _, irq = setup()
    queue, _ = driver.start(2)
    src = driver.heap.alloc(1, data=b"x")
    dst = driver.heap.alloc(1)
    queue.add([Buffer(src, 1), Buffer(dst, 1, writable=True)])
    assert irq.edges == 1
    resets = device.resets
    driver.write(r.STATUS, 0)
    assert driver.status == 0 and device.resets == resets + 1
    assert driver.read(r.INTERRUPT_STATUS) == 0
    driver.write(r.QUEUE_SEL, 0)
    assert driver.read(r.QUEUE_READY) == 0
    assert transport.driver_features == 0
    # And the device can be brought up again from scratch.
    queue, _ = driver.start(2)
    head = queue.add([Buffer(src, 1), Buffer(dst, 1, writable=True)])
    assert queue.take_used() == [(head, 1)]


def test_queue_registers_and_bad_queue_selection():
    _, _, driver, _, _ = setup()
    driver.write(r.QUEUE_SEL, 1)
    assert driver.read(r.QUEUE_NUM_MAX) == 8
    driver.write(r.QUEUE_SEL, 7)
    assert driver.read(r.QUEUE_NUM_MAX) == 0  # no such queue
    driver.write(r.QUEUE_NUM, 4)  # ignored, no exception


def test_notify_before_driver_ok_does_nothing():
    _, _, driver, memory, irq = setup()
    assert driver.negotiate()
    queue = driver.setup_queue(0)
    src = driver.heap.alloc(1)
    queue.add([Buffer(src, 1)])
    assert queue.take_used() == []
    assert irq.edges == 0


def test_queue_outside_ram_sets_needs_reset():
    _, transport, driver, _, irq = setup()
    assert driver.negotiate()
    driver.write(r.QUEUE_SEL, 0)
    driver.write(r.QUEUE_NUM, 16)
    driver.write(r.QUEUE_DESC_LOW, 0)
    driver.write(r.QUEUE_DESC_HIGH, 0x10)  # 64 GiB: no RAM there
    driver.write(r.QUEUE_READY, 1)
    assert driver.status & c.STATUS_NEEDS_RESET
    assert driver.read(r.QUEUE_READY) == 0
    assert transport.errors == 1


def test_queue_size_must_be_a_power_of_two_within_the_maximum():
    for size in (3, 32, 0):
        _, _, driver, _, _ = setup()
        assert driver.negotiate()
        driver.write(r.QUEUE_SEL, 0)
        driver.write(r.QUEUE_NUM, size)
        driver.write(r.QUEUE_READY, 1)
        assert driver.status & c.STATUS_NEEDS_RESET, size


def test_malformed_chain_sets_needs_reset_and_raises_config_interrupt():
    device, transport, driver, memory, irq = setup()
    queue, _ = driver.start(2)
    # A descriptor that points to itself: a loop.
    buf = driver.heap.alloc(4)
    queue.write_descriptor(0, buf, 4, DESC_F_NEXT, following=0)
    queue.publish(0)
    assert driver.status & c.STATUS_NEEDS_RESET
    assert driver.read(r.INTERRUPT_STATUS) & c.INTERRUPT_CONFIG and irq.edges == 1
    # Further notifications are ignored until the driver resets the device.
    queue.publish(0)
    assert queue.take_used() == []
    driver.write(r.STATUS, 0)
    assert driver.status == 0
    queue, _ = driver.start(2)
    src = driver.heap.alloc(2, data=b"ok")
    dst = driver.heap.alloc(2)
    head = queue.add([Buffer(src, 2), Buffer(dst, 2, writable=True)])
    assert queue.take_used() == [(head, 2)]


def test_indirect_descriptor_without_negotiation_is_an_error():
    _, _, driver, _, _ = setup()
    accept = driver.device_features() & ~(1 << c.F_INDIRECT_DESC)
    queue, _ = driver.start(2, accept=accept)
    table = driver.heap.alloc(16)
    queue.write_descriptor(0, table, 16, DESC_F_INDIRECT)
    queue.publish(0)
    assert driver.status & c.STATUS_NEEDS_RESET


def test_indirect_chain_is_served():
    _, _, driver, memory, _ = setup()
    queue, _ = driver.start(2)
    src1 = driver.heap.alloc(3, data=b"abc")
    src2 = driver.heap.alloc(3, data=b"def")
    dst1 = driver.heap.alloc(2)
    dst2 = driver.heap.alloc(4)
    head = queue.add([Buffer(src1, 3), Buffer(src2, 3), Buffer(dst1, 2, True), Buffer(dst2, 4, True)],
                     indirect=True)
    assert queue.take_used() == [(head, 6)]
    assert memory.read(dst1, 2) + memory.read(dst2, 4) == b"abcdef"


def test_unknown_register_sizes_and_writes_are_harmless():
    _, transport, driver, _, _ = setup()
    assert transport.read(r.STATUS, 1) == 0
    transport.write(r.STATUS, 2, 0xFFFF)
    transport.write(r.MAGIC_VALUE, 4, 0)
    transport.write(0x0F0, 4, 1)
    assert driver.read(r.MAGIC_VALUE) == r.MAGIC
    assert driver.status == 0


def test_config_writes_reach_the_device_only_after_driver_is_set():
    device, transport, driver, _, _ = setup()
    transport.write(r.CONFIG + 2, 1, 7)
    assert device.config_writes == []
    driver.write(r.STATUS, c.STATUS_ACKNOWLEDGE | c.STATUS_DRIVER)
    transport.write(r.CONFIG + 2, 1, 7)
    assert device.config_writes == [(2, b"\x07")]


def test_config_change_bumps_generation_and_interrupts():
    _, transport, driver, _, irq = setup()
    driver.start(2)
    generation = driver.read(r.CONFIG_GENERATION)
    transport.config_changed()
    assert driver.read(r.CONFIG_GENERATION) != generation
    assert driver.read(r.INTERRUPT_STATUS) == c.INTERRUPT_CONFIG and irq.edges == 1


def test_device_exception_becomes_needs_reset():
    device, transport, driver, _, _ = setup()

    def broken(index):
        raise RuntimeError("bug")

    device.queue_notify = broken
    queue, _ = driver.start(2)
    queue.kick()
    assert driver.status & c.STATUS_NEEDS_RESET


def test_closed_transport_leaves_guest_ram_free_to_unmap():
    transport, driver, memory, _ = make_transport(EchoDevice())
    driver.start(2)
    mappings = [region.mapping for region in memory.regions]
    transport.close()
    memory.close()
    assert all(mapping.closed for mapping in mappings)
