"""virtio-rng, virtio-console and virtio-net (fake and unix-socket backends) through a fake driver."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from devices.virtio import constants as c
from devices.virtio.console import VirtioConsole
from devices.virtio.io_loop import IoLoop
from devices.virtio.mmio import STATUS
from devices.virtio.net import VirtioNet
from devices.virtio.net_backends import (
    F_GUEST_CSUM,
    NET_HEADER_SIZE,
    PLAIN_HEADER,
    NetBackend,
    SocketBackend,
    TapBackend,
)
from devices.virtio.rng import VirtioRng
from tests.unit.virtio_driver import Buffer, FakeBackend, make_transport
from vmm.errors import PyvmmError

# -- virtio-rng ---------------------------------------------------------------------


def test_rng_fills_writable_buffers_from_the_source():
    device = VirtioRng(source=lambda n: b"\x5a" * n)
    transport, driver, memory, irq = make_transport(device)
    (queue,) = driver.start(1)
    assert driver.read(0x008) == c.DEVICE_RNG
    first = driver.heap.alloc(64)
    second = driver.heap.alloc(16)
    head = queue.add([Buffer(first, 64, True), Buffer(second, 16, True)])
    assert queue.take_used() == [(head, 80)]
    assert memory.read(first, 64) + memory.read(second, 16) == b"\x5a" * 80
    assert irq.edges == 1 and device.bytes_served == 80


def test_rng_gives_real_randomness_and_ignores_readable_only_chains():
    device = VirtioRng()
    _, driver, memory, _ = make_transport(device)
    (queue,) = driver.start(1)
    buf = driver.heap.alloc(1024)
    queue.add([Buffer(buf, 1024, True)])
    assert len(set(memory.read(buf, 1024))) > 64
    head = queue.add([Buffer(buf, 8)])  # nothing writable: nothing served, no error
    assert queue.take_used()[-1] == (head, 0)
    assert not driver.status & c.STATUS_NEEDS_RESET


# -- virtio-console --------------------------------------------------------------------


class DueWork:
    """An I/O loop on a clock of its own, which moves only when the test runs the delayed work."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pending: list[tuple[float, object]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, work) -> None:
        self.pending.append((self.now + delay, work))

    def run_due(self) -> None:
        """Move the clock to the earliest piece of work and run what is due then."""
        self.now = max(self.now, min(when for when, _ in self.pending))
        due = [work for when, work in self.pending if when <= self.now]
        self.pending = [(when, work) for when, work in self.pending if when > self.now]
        for work in due:
            work()


class ConsoleHarness:
    def __init__(self) -> None:
        self.output = bytearray()
        self.wakeups = 0
        self.loop = DueWork()
        self.device = VirtioConsole(self.output.extend, self.loop, room_available=self._wake)
        self.transport, self.driver, self.memory, self.irq = make_transport(self.device)

    def _wake(self) -> None:
        self.wakeups += 1

    def send(self, tx, text: bytes) -> int:
        buf = self.driver.heap.alloc(len(text), data=text)
        return tx.add([Buffer(buf, len(text))])


def test_console_output_reaches_the_writer():
    h = ConsoleHarness()
    rx, tx = h.driver.start(2)
    text = b"hello from hvc0\n"
    buf = h.driver.heap.alloc(len(text), data=text)
    head = tx.add([Buffer(buf, len(text))])
    assert bytes(h.output) == text
    assert tx.take_used() == [(head, 0)]


def test_console_input_waits_for_receive_buffers():
    h = ConsoleHarness()
    assert h.device.receive(b"early") == 0  # no driver yet: the host console keeps it
    rx, tx = h.driver.start(2)
    wakeups = h.wakeups
    assert wakeups >= 1  # activation lets the host console try again
    assert h.device.receive(b"abc") == 0  # driver up, but no buffers posted yet
    buf1 = h.driver.heap.alloc(4)
    buf2 = h.driver.heap.alloc(4)
    rx.add([Buffer(buf1, 4, True)])
    assert h.wakeups == wakeups + 1  # posting buffers wakes the host console
    rx.add([Buffer(buf2, 4, True)])
    # Nothing yet: the guest has not written to the port, so it may not be registered.
    assert h.device.receive(b"0123456789") == 0
    out = h.driver.heap.alloc(2, data=b"$ ")
    tx.add([Buffer(out, 2)])
    assert h.wakeups == wakeups + 3  # the first output releases the held input
    assert h.device.receive(b"0123456789") == 8
    assert h.memory.read(buf1, 4) + h.memory.read(buf2, 4) == b"01234567"
    assert [length for _, length in rx.take_used()] == [4, 4]
    assert h.irq.edges == 1  # for the input; the output's interrupt is decided later
    h.loop.run_due()
    assert h.irq.edges == 2  # the driver did not take the output buffer back: it wants to hear


def test_console_output_taken_back_by_polling_raises_no_interrupt():
    # Linux's hvc write: kick, poll until the buffer is used, take it back, and
    # move used_event on (virtqueue_get_buf), all with interrupts disabled.
    h = ConsoleHarness()
    rx, tx = h.driver.start(2)
    for n in range(200):
        head = h.send(tx, b"line %d\n" % n)
        assert tx.take_used() == [(head, 0)]
        tx.set_used_event(tx.last_used)
    assert len(h.loop.pending) == 1  # one decision for the whole burst, not one per write
    while h.loop.pending:
        h.loop.run_due()
    assert h.irq.edges == 0
    assert bytes(h.output) == b"".join(b"line %d\n" % n for n in range(200))


def test_console_output_interrupt_waits_for_the_queue_to_be_quiet():
    h = ConsoleHarness()
    rx, tx = h.driver.start(2)
    h.send(tx, b"a")
    # A second write just before the first decision is due puts the decision off.
    h.loop.now = h.loop.pending[0][0] - 0.002
    h.send(tx, b"b")
    h.loop.run_due()
    assert h.irq.edges == 0 and h.loop.pending  # still busy: decided later
    h.loop.run_due()
    assert h.irq.edges == 1  # used_event (0) still asks: the driver waits for this interrupt
    assert [length for _, length in tx.take_used()] == [0, 0]


def test_console_output_decision_does_not_wait_for_a_busy_device():
    h = ConsoleHarness()
    rx, tx = h.driver.start(2)
    h.send(tx, b"x")
    held, release = threading.Event(), threading.Event()

    def vcpu_sending():  # holds the device, as a vCPU blocked on the host's output does
        with h.transport.lock:
            held.set()
            release.wait(5)

    vcpu = threading.Thread(target=vcpu_sending)
    vcpu.start()
    assert held.wait(5)
    try:
        h.loop.run_due()  # returns at once
        assert h.irq.edges == 0 and len(h.loop.pending) == 1  # and looks again later
    finally:
        release.set()
        vcpu.join()
    h.loop.run_due()
    assert h.irq.edges == 1


def test_console_output_decision_after_a_reset_does_nothing():
    h = ConsoleHarness()
    rx, tx = h.driver.start(2)
    h.send(tx, b"x")
    h.driver.write(STATUS, 0)  # the driver resets the device
    h.loop.run_due()
    assert h.irq.edges == 0 and not h.loop.pending


def test_console_config_has_one_port():
    h = ConsoleHarness()
    assert h.driver.config(4, 4) == 1


# -- virtio-net with a fake backend ------------------------------------------------------


class NetHarness:
    def __init__(self, backend: NetBackend, loop=None, mac: bytes = b"\x52\x54\x00\x01\x02\x03") -> None:
        self.backend = backend
        self.device = VirtioNet(backend, mac=mac, loop=loop if loop is not None else object())
        self.transport, self.driver, self.memory, self.irq = make_transport(self.device)

    def start(self):
        self.rx, self.tx = self.driver.start(2)
        return self.rx, self.tx

    def post_rx(self, count: int = 1, size: int = 1526) -> list[int]:
        buffers = []
        for _ in range(count):
            buf = self.driver.heap.alloc(size)
            self.rx.add([Buffer(buf, size, True)])
            buffers.append(buf)
        return buffers

    def transmit(self, frame: bytes, header: bytes = PLAIN_HEADER) -> None:
        hdr = self.driver.heap.alloc(NET_HEADER_SIZE, data=header)
        body = self.driver.heap.alloc(len(frame), data=frame)
        self.tx.add([Buffer(hdr, NET_HEADER_SIZE), Buffer(body, len(frame))])


FRAME = bytes.fromhex("ffffffffffff5254000102030806") + bytes(46)


def test_net_config_and_features():
    h = NetHarness(FakeBackend(offloads=1 << F_GUEST_CSUM))
    assert bytes(h.driver.config(i, 1) for i in range(6)) == b"\x52\x54\x00\x01\x02\x03"
    features = h.driver.device_features()
    assert features & (1 << 5) and features & (1 << F_GUEST_CSUM)
    h.start()
    assert h.backend.offloads == h.transport.driver_features
    assert not h.backend.paused


def test_net_transmit_passes_header_and_frame():
    h = NetHarness(FakeBackend())
    h.start()
    h.transmit(FRAME)
    assert h.backend.sent == [PLAIN_HEADER + FRAME]
    assert h.tx.take_used()[0][1] == 0


def test_net_receive_fills_buffers_and_pauses_without_them():
    backend = FakeBackend()
    h = NetHarness(backend)
    h.start()
    (buf,) = h.post_rx(1)
    backend.incoming = [PLAIN_HEADER + FRAME, PLAIN_HEADER + FRAME[::-1]]
    backend.ready()
    used = h.rx.take_used()
    assert [length for _, length in used] == [NET_HEADER_SIZE + len(FRAME)]
    assert h.memory.read(buf + NET_HEADER_SIZE, len(FRAME)) == FRAME
    assert backend.paused  # the second packet waits for a buffer
    (buf2,) = h.post_rx(1)  # the guest's notification delivers it
    assert h.memory.read(buf2 + NET_HEADER_SIZE, len(FRAME)) == FRAME[::-1]
    assert not backend.paused


def test_net_packet_bigger_than_the_buffer_is_dropped():
    backend = FakeBackend()
    h = NetHarness(backend)
    h.start()
    h.post_rx(1, size=64)
    backend.incoming = [PLAIN_HEADER + bytes(1000)]
    backend.ready()
    assert [length for _, length in h.rx.take_used()] == [0]
    assert h.device.rx_dropped == 1
    assert not h.driver.status & c.STATUS_NEEDS_RESET


def test_net_reset_pauses_the_backend_and_clears_offloads():
    backend = FakeBackend()
    h = NetHarness(backend)
    h.start()
    h.driver.write(0x070, 0)
    assert backend.paused and backend.offloads == 0
    backend.incoming = [PLAIN_HEADER + FRAME]
    backend.ready()  # not active: nothing delivered, no exception
    assert backend.incoming


def test_net_oversized_transmit_is_dropped():
    h = NetHarness(FakeBackend())
    h.start()
    h.transmit(b"")  # header only
    assert h.device.backend.sent == []
    assert not h.driver.status & c.STATUS_NEEDS_RESET


# -- the socket backend: two devices joined through a real unix socket -------------------


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_socket_backend_joins_two_guests(tmp_path):
    path = str(tmp_path / "net.sock")
    loop = IoLoop()
    listener = SocketBackend("listen", path)
    a = NetHarness(listener, loop=loop, mac=b"\x52\x54\x00\x00\x00\x0a")
    connector = SocketBackend("connect", path)
    b = NetHarness(connector, loop=loop, mac=b"\x52\x54\x00\x00\x00\x0b")
    loop.start()
    try:
        a.start()
        b.start()
        with b.transport.lock:
            b_buffers = b.post_rx(4)
        with a.transport.lock:
            a.transmit(FRAME)  # may race the accept: send until it arrives
        assert wait_for(lambda: a.device.backend._conn is not None)
        for _ in range(3):
            with a.transport.lock:
                a.transmit(FRAME)
        assert wait_for(lambda: b.device.rx_packets >= 3)
        assert b.memory.read(b_buffers[0] + NET_HEADER_SIZE, len(FRAME)) == FRAME
        assert b.memory.read(b_buffers[0], NET_HEADER_SIZE) == PLAIN_HEADER
        # And back, with frames of different sizes.
        with a.transport.lock:
            a_buffers = a.post_rx(2)
        with b.transport.lock:
            b.transmit(b"\x01" * 60)
            b.transmit(b"\x02" * 1514)
        assert wait_for(lambda: a.device.rx_packets == 2)
        assert a.memory.read(a_buffers[1] + NET_HEADER_SIZE, 1514) == b"\x02" * 1514
        assert a.irq.edges >= 1 and b.irq.edges >= 1
    finally:
        loop.stop()
        listener.close()
        connector.close()


def test_socket_backend_errors_are_one_line(tmp_path):
    with pytest.raises(PyvmmError, match="listen:PATH first"):
        SocketBackend("connect", str(tmp_path / "nobody"))
    with pytest.raises(PyvmmError, match="cannot listen"):
        SocketBackend("listen", str(tmp_path / "no-such-dir" / "sock"))
    with pytest.raises(PyvmmError, match="listen:PATH or connect:PATH"):
        SocketBackend("dial", str(tmp_path / "x"))


def test_socket_listen_replaces_a_stale_socket_file(tmp_path):
    path = str(tmp_path / "stale.sock")
    first = SocketBackend("listen", path)
    first._listener.close()  # as if the process had died
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        with pytest.raises(ConnectionRefusedError):
            client.connect(path)  # the file is there, nobody listens
    second = SocketBackend("listen", path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # the new listener answers on the same path
    finally:
        second.close()


def test_tap_backend_errors_are_one_line(tmp_path):
    with pytest.raises(PyvmmError, match="1 to 15 characters"):
        TapBackend("x" * 20)
    with pytest.raises(PyvmmError, match="cannot open"):
        TapBackend("tap0", tun_path=str(tmp_path / "missing"))


# -- the I/O loop ------------------------------------------------------------------------


def test_io_loop_runs_callbacks_and_survives_a_failing_one():
    import os

    loop = IoLoop()
    loop.start()
    fired = threading.Event()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    calls = []

    def on_ready():
        os.eventfd_read(efd)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first callback fails")
        fired.set()

    try:
        loop.add_reader(efd, on_ready)
        os.eventfd_write(efd, 1)
        assert wait_for(lambda: calls)
        os.eventfd_write(efd, 1)
        assert fired.wait(5)
        loop.remove_reader(efd)
        done = threading.Event()
        loop.call_soon(done.set)
        assert done.wait(5)
    finally:
        loop.stop()
        os.close(efd)


def test_io_loop_runs_delayed_work_in_time_order_and_not_early():
    loop = IoLoop()
    loop.start()
    ran: list[tuple[str, float]] = []
    done = threading.Event()
    try:
        start = time.monotonic()
        loop.call_later(0.05, lambda: (ran.append(("late", time.monotonic())), done.set()))
        loop.call_later(0.01, lambda: ran.append(("early", time.monotonic())))
        loop.call_later(0.01, lambda: ran.append(("early, second", time.monotonic())))
        assert done.wait(5)
        assert [name for name, _ in ran] == ["early", "early, second", "late"]
        assert ran[0][1] - start >= 0.01 and ran[2][1] - start >= 0.05  # never sooner than asked
    finally:
        loop.stop()


def test_header_layout():
    assert len(PLAIN_HEADER) == NET_HEADER_SIZE
    assert struct.unpack("<H", PLAIN_HEADER[10:])[0] == 1
