"""Option parsing and machine wiring of the virtio devices, with fake VMs for both dispatch paths."""

from __future__ import annotations

import os
import struct
import time

import pytest

from devices import uart
from devices.virtio import blk
from devices.virtio import mmio as r
from devices.virtio.irqfd_line import IrqfdLine
from tests.unit.board import make_board
from tests.unit.virtio_driver import Buffer, FakeDriver
from vmm import layout
from vmm.bus import Bus, NullIrqLine
from vmm.errors import PyvmmError
from vmm.memory import GuestMemory
from vmm.virtio_options import (
    DiskSpec,
    FsSpec,
    NetSpec,
    VirtioSpecs,
    parse_console,
    parse_disk,
    parse_fs,
    parse_net,
)
from vmm.virtio_setup import plug_virtio_devices

# -- parsing -----------------------------------------------------------------------------


def test_parse_disk():
    assert parse_disk("a.img") == DiskSpec("a.img")
    assert parse_disk("/x/b.qcow2,format=qcow2,readonly=on,serial=SN-1") == \
        DiskSpec("/x/b.qcow2", "qcow2", True, "SN-1")
    assert parse_disk("c,readonly=off").readonly is False


@pytest.mark.parametrize("text, message", [
    ("", "path comes first"),
    ("a,format=vmdk", "raw or qcow2"),
    ("a,readonly=maybe", "on or off"),
    ("a,serial=" + "x" * 21, "at most 20"),
    ("a,cache=none", "unknown option 'cache'"),
    ("a,readonly", "KEY=VALUE"),
    ("a,serial=1,serial=2", "given twice"),
])
def test_parse_disk_errors(text, message):
    with pytest.raises(PyvmmError, match=message):
        parse_disk(text)


def test_parse_fs():
    assert parse_fs("/srv,tag=share") == FsSpec("/srv", "share")
    assert parse_fs("rel/dir,tag=t,readonly=on") == FsSpec("rel/dir", "t", True)


@pytest.mark.parametrize("text, message", [
    ("/srv", "tag=TAG is needed"),
    ("/srv,tag=" + "x" * 37, "1 to 36"),
    (",tag=a", "directory comes first"),
    ("/srv,tag=a,cache=always", "unknown option 'cache'"),
])
def test_parse_fs_errors(text, message):
    with pytest.raises(PyvmmError, match=message):
        parse_fs(text)


def test_parse_net():
    assert parse_net("tap=tap0") == NetSpec(tap="tap0")
    assert parse_net("tap=tap1,mac=52:54:00:AB:cd:01").mac == bytes.fromhex("525400abcd01")
    assert parse_net("socket=listen:/tmp/n.sock") == NetSpec(socket_mode="listen", socket_path="/tmp/n.sock")
    assert parse_net("socket=connect:rel/path").socket_mode == "connect"


@pytest.mark.parametrize("text, message", [
    ("tap=", "name is missing"),
    ("user", "KEY=VALUE"),
    ("tap=a,socket=listen:/x", "exactly one"),
    ("socket=dial:/x", "socket=listen:PATH"),
    ("socket=listen:", "socket=listen:PATH"),
    ("tap=a,mac=01:00:5e:00:00:01", "multicast"),
    ("tap=a,mac=zz", "six hex bytes"),
    ("tap=a,vhost=on", "unknown option"),
])
def test_parse_net_errors(text, message):
    with pytest.raises(PyvmmError, match=message):
        parse_net(text)


def test_parse_console():
    assert parse_console("virtio") is True
    assert parse_console("serial") is False
    with pytest.raises(PyvmmError):
        parse_console("vga")


# -- wiring --------------------------------------------------------------------------------


class SoftwareVm:
    """A VM with interrupt lines but no eventfd paths (like the software CPU)."""

    def __init__(self) -> None:
        self.lines: dict[int, NullIrqLine] = {}

    def irq_line(self, gsi):
        return self.lines.setdefault(gsi, NullIrqLine())

    def notifier(self, address, size, datamatch):
        return None

    def irq_eventfd(self, gsi):
        return None


class EventfdVm(SoftwareVm):
    """A VM that hands out eventfds the way KVM does; the test plays KVM's part."""

    def __init__(self) -> None:
        super().__init__()
        self.notifiers: dict[tuple[int, int], int] = {}
        self.irqfds: dict[int, int] = {}

    def notifier(self, address, size, datamatch):
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.notifiers[(address, datamatch)] = fd
        return fd

    def irq_eventfd(self, gsi):
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.irqfds[gsi] = fd
        return fd


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "d.raw"
    path.write_bytes(b"\x11" * 512 + bytes(64 * 1024 - 512))
    return str(path)


def build(vm, specs, compiled_blk=True):
    """The devices, the board they were plugged into (its .mmio is the bus) and guest memory."""
    memory = GuestMemory(16 << 20)
    board = make_board(memory)
    return plug_virtio_devices(board, vm, specs, irqchip=True, compiled_blk=compiled_blk), board, memory


def test_devices_get_consecutive_windows_and_gsis(disk, tmp_path):
    specs = VirtioSpecs(disks=[DiskSpec(disk), DiskSpec(disk, readonly=True, serial="ro")],
                        nets=[NetSpec(socket_mode="listen", socket_path=str(tmp_path / "s"))],
                        console=True, rng=True)
    devices, board, _ = build(SoftwareVm(), specs)
    try:
        base, irq = r.FIRST_WINDOW, r.FIRST_GSI
        assert base == layout.MMIO_HOLE_START and irq == 16
        assert [(w.base, w.size, w.gsi) for w in devices.windows] == [
            (base + i * 0x1000, 0x1000, irq + i) for i in range(5)]
        ids = [board.mmio.read(w.base + r.DEVICE_ID, 4) for w in devices.windows]
        assert ids == [2, 2, 1, 3, 4]
        # The console is the fourth device, and the one that takes the host console's input.
        assert devices.transports[3].device is devices.console and devices.console.device_id == 3
        assert board.console_input == devices.console.receive
        assert devices.cmdline_fragments() == [
            f"virtio_mmio.device=4K@{base + i * 0x1000:#x}:{irq + i}" for i in range(5)]
        names = ["virtio-blk0", "virtio-blk1", "virtio-net0", "virtio-console", "virtio-rng"]
        assert [line.split(":")[0].strip() for line in devices.stats_lines()] == [
            f"{name} at {base + i * 0x1000:#x} gsi {irq + i}" for i, name in enumerate(names)]
        assert "requests 0" in devices.stats_lines()[0] and "bytes_served 0" in devices.stats_lines()[4]
    finally:
        devices.close()


@pytest.mark.parametrize("compiled_blk", [True, False])
def test_the_machine_says_whether_disks_use_the_compiled_request_path(disk, compiled_blk):
    devices, _, _ = build(SoftwareVm(), VirtioSpecs(disks=[DiskSpec(disk), DiskSpec(disk, readonly=True)]),
                          compiled_blk=compiled_blk)
    try:
        assert [t.device.compiled_requests for t in devices.transports] == [compiled_blk, compiled_blk]
    finally:
        devices.close()


def test_too_many_devices_is_a_user_error(disk):
    with pytest.raises(PyvmmError, match="supports 8"):
        build(SoftwareVm(), VirtioSpecs(disks=[DiskSpec(disk, readonly=True)] * 9))


def test_missing_disk_is_a_user_error(tmp_path):
    with pytest.raises(PyvmmError, match="no such file"):
        build(SoftwareVm(), VirtioSpecs(disks=[DiskSpec(str(tmp_path / "nope.img"))]))


def read_request(driver: FakeDriver, queue) -> tuple[int, int]:
    header = driver.heap.alloc(16, data=struct.pack("<IIQ", blk.T_IN, 0, 0))
    data = driver.heap.alloc(512)
    status = driver.heap.alloc(1, data=b"\xff")
    queue.add([Buffer(header, 16), Buffer(data, 512, True), Buffer(status, 1, True)], kick=False)
    return data, status


class BusTransport:
    """The driver's view of a device through the MMIO bus."""

    def __init__(self, bus: Bus, base: int) -> None:
        self.bus, self.base = bus, base

    def read(self, offset, size):
        return self.bus.read(self.base + offset, size)

    def write(self, offset, size, value):
        self.bus.write(self.base + offset, size, value)


def test_software_path_serves_kicks_on_the_calling_thread(disk):
    vm = SoftwareVm()
    devices, io, memory = build(vm, VirtioSpecs(disks=[DiskSpec(disk)]))
    try:
        window = devices.windows[0]
        driver = FakeDriver(BusTransport(io.mmio, window.base), memory)
        (queue,) = driver.start(1)
        data, status = read_request(driver, queue)
        queue.kick()  # an MMIO write: served before it returns
        assert memory.read_u8(status) == blk.S_OK and memory.read(data, 4) == b"\x11" * 4
        assert vm.lines[window.gsi].edges == 1
    finally:
        devices.close()


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_eventfd_path_serves_kicks_on_the_io_thread(disk):
    vm = EventfdVm()
    devices, io, memory = build(vm, VirtioSpecs(disks=[DiskSpec(disk)]))
    devices.start()
    try:
        window = devices.windows[0]
        driver = FakeDriver(BusTransport(io.mmio, window.base), memory)
        (queue,) = driver.start(1)
        assert isinstance(devices.transports[0].irq, IrqfdLine)
        irqfd = vm.irqfds[window.gsi]
        data, status = read_request(driver, queue)
        # KVM would signal the ioeventfd instead of exiting for the QueueNotify write.
        os.eventfd_write(vm.notifiers[(window.base + r.QUEUE_NOTIFY, 0)], 1)
        assert wait_for(lambda: memory.read_u8(status) == blk.S_OK)
        # The status byte is written before the used ring and the interrupt: wait for the edge too.
        assert wait_for(lambda: _readable(irqfd))
        assert os.eventfd_read(irqfd) == 1  # one edge, through the irqfd
        driver.ack_interrupt()
        assert not _readable(irqfd)  # everything acknowledged: no further edge
    finally:
        devices.close()


def _readable(fd: int) -> bool:
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return False
    os.eventfd_write(fd, value)
    return True


def test_a_shared_directory_is_a_virtio_fs_device(tmp_path):
    devices, io, _ = build(SoftwareVm(), VirtioSpecs(filesystems=[FsSpec(str(tmp_path), "share", True)]))
    try:
        assert io.mmio.read(devices.windows[0].base + r.DEVICE_ID, 4) == 26
    finally:
        devices.close()
    with pytest.raises(PyvmmError, match="no such directory"):
        build(SoftwareVm(), VirtioSpecs(filesystems=[FsSpec(str(tmp_path / "nope"), "t")]))


# -- where typed input goes with --console virtio -------------------------------------------


def console_machine(*, interactive: bool):
    """A board with the serial port and a virtio-console; (board, the UART, the console's driver)."""
    memory = GuestMemory(16 << 20)
    board = make_board(memory)
    board.console_interactive = interactive
    board.notices = []
    board.console_notice = board.notices.append
    serial = uart.plug(board)
    devices = plug_virtio_devices(board, SoftwareVm(), VirtioSpecs(console=True), irqchip=True, compiled_blk=True)
    return board, serial, FakeDriver(devices.transports[0], memory), devices


def test_typed_input_goes_to_the_serial_port_until_the_guest_has_hvc0_up():
    board, serial, driver, devices = console_machine(interactive=True)
    try:
        typed = board.console_input
        assert typed(b"early") == 0  # the guest has written nowhere yet: the input waits
        serial.write(0, 1, ord("$"))  # the guest's shell prompt on ttyS0
        assert typed(b"ls\r") == 3 and serial.read(0, 1) == ord("l")
        assert len(board.notices) == 1 and "ttyS0" in board.notices[0]
        rx, tx = driver.start(2)
        receive_buffer = driver.heap.alloc(16)
        rx.add([Buffer(receive_buffer, 16, True)])
        assert typed(b"x") == 1 and serial.read(0, 1) == ord("s")  # the port is not up: still ttyS0
        prompt = driver.heap.alloc(2, data=b"# ")
        tx.add([Buffer(prompt, 2)])  # the guest wrote to hvc0: its port is up
        assert typed(b"pwd\r") == 4
        assert driver.memory.read(receive_buffer, 4) == b"pwd\r"
        assert len(board.notices) == 1  # said once
    finally:
        devices.close()


def test_piped_input_waits_for_hvc0():
    board, serial, driver, devices = console_machine(interactive=False)
    try:
        serial.write(0, 1, ord("$"))
        assert board.console_input(b"meant for hvc0\n") == 0
        assert board.notices == []
    finally:
        devices.close()
