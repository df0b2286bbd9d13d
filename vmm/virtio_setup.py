"""The machine's virtio devices: the one call the machine builder makes.

vmm/virtio_options.py turns --disk/--net/--console/--rng into specs;
`plug_virtio_devices()` opens the backends, puts a virtio-mmio window per
device where devices/virtio/mmio.py says (`window(n)`: a page each from the
start of the MMIO hole, GSI 16 + n), adds each window's DSDT entry to the
board, and returns a `VirtioDevices` whose `start()` / `close()` bracket the
machine's run.

Where the work runs: on KVM each queue's QueueNotify has an ioeventfd and
each device's interrupt an irqfd, so requests are served on
the I/O thread (devices/virtio/io_loop.py) and the vCPU never exits for a
kick. Elsewhere (the software CPU) the kick is an MMIO write handled on the
vCPU thread, and the interrupt goes through `vm.irq_line`. Host input
(packets, the socket peer) is always read on the I/O thread.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from devices.board import Board
from devices.virtio import mmio
from devices.virtio.io_loop import IoLoop
from devices.virtio.irqfd_line import IrqfdLine
from vmm.bus import IrqLine, NullIrqLine
from vmm.errors import PyvmmError
from vmm.virtio_options import DiskSpec, FsSpec, NetSpec, VirtioSpecs

# Each device type is imported where a device of that type is made: a machine
# loads only the types it has (`pyvmm run`, for one, has no disk and no NIC).
if TYPE_CHECKING:
    from devices.virtio.blk import VirtioBlock
    from devices.virtio.console import VirtioConsole
    from devices.virtio.fs import VirtioFs
    from devices.virtio.net import VirtioNet

log = logging.getLogger(__name__)


@dataclass
class VirtioDevices:
    windows: list[mmio.Window]
    transports: list[mmio.VirtioMmioTransport]
    loop: IoLoop
    console: VirtioConsole | None = None  # give `console.receive` to the host console
    closed: bool = False

    def start(self) -> None:
        """Start the I/O thread; call before the vCPUs run."""
        self.loop.start()

    def close(self) -> None:
        """Stop the I/O thread, then flush and close disks and backends; after the vCPUs stopped."""
        if self.closed:
            return
        self.closed = True
        self.loop.stop()
        for transport in self.transports:
            try:
                transport.close()
            except (OSError, PyvmmError) as err:
                log.warning("closing %s: %s", transport.name, err)

    def cmdline_fragments(self) -> list[str]:
        """`virtio_mmio.device=SIZE@BASE:IRQ` for each device.

        Only for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES that do
        not also read the DSDT (the Debian kernel reads only the DSDT; a kernel
        reading both would probe each device twice).
        """
        return [f"virtio_mmio.device={w.size // 1024}K@{w.base:#x}:{w.gsi}" for w in self.windows]

    def stats_lines(self) -> list[str]:
        lines = []
        for transport, window in zip(self.transports, self.windows, strict=True):
            device = transport.device
            counters = {name: getattr(device, name) for name in
                        ("requests", "errors", "rx_packets", "tx_packets", "rx_dropped", "bytes_served")
                        if hasattr(device, name)}
            shown = ", ".join(f"{name} {value}" for name, value in counters.items())
            needs_reset = f", {transport.errors} device errors" if transport.errors else ""
            lines.append(f"  {transport.name} at {window.base:#x} gsi {window.gsi}: {shown}{needs_reset}")
        return lines


def _open_net(spec: NetSpec, loop: IoLoop) -> VirtioNet:
    from devices.virtio.net import VirtioNet
    from devices.virtio.net_backends import SocketBackend, TapBackend

    if spec.tap is not None:
        backend = TapBackend(spec.tap)
    else:
        backend = SocketBackend(spec.socket_mode, spec.socket_path)
    return VirtioNet(backend, spec.mac, loop)


def _open_disk(spec: DiskSpec, compiled_requests: bool) -> VirtioBlock:
    from devices.virtio.blk import VirtioBlock
    from vmm.image.open import open_image

    if not os.path.exists(spec.path):
        raise PyvmmError(f"--disk {spec.path}: no such file")
    image = open_image(spec.path, spec.format, readonly=spec.readonly)
    if image.size % 512:
        image.close()
        raise PyvmmError(f"--disk {spec.path}: size {image.size} is not a multiple of 512 bytes")
    return VirtioBlock(image, serial=spec.serial, readonly=spec.readonly, compiled_requests=compiled_requests)


def _open_fs(spec: FsSpec) -> VirtioFs:
    from devices.virtio.fs import VirtioFs
    from vmm.fuse.server import FuseServer

    if not os.path.isdir(spec.path):
        raise PyvmmError(f"--fs {spec.path}: no such directory")
    try:
        server = FuseServer(spec.path, readonly=spec.readonly, name=f"virtio-fs {spec.tag}", hidden=spec.hidden)
    except OSError as err:
        raise PyvmmError(f"--fs {spec.path}: {err.strerror}") from None
    return VirtioFs(server, spec.tag)


def plug_virtio_devices(board: Board, vm, specs: VirtioSpecs, *, irqchip: bool,
                        compiled_blk: bool) -> VirtioDevices:
    """Create the devices `specs` asks for, put them on `board` and describe them in its DSDT.

    `vm` is the accelerator's VirtualMachine (for irq lines, ioeventfds and
    irqfds); `irqchip` says whether the machine has interrupt controllers;
    `compiled_blk` whether raw disks use virtio-blk's compiled request path. A
    virtio-console takes over the host console's input from the serial port.
    """
    if specs.count > mmio.MAX_DEVICES:
        raise PyvmmError(f"{specs.count} virtio devices requested; pyvmm supports "
                         f"{mmio.MAX_DEVICES} (one per free interrupt line)")
    loop = IoLoop()
    result = VirtioDevices([], [], loop)
    devices: list[tuple[str, object]] = []
    try:
        for n, disk in enumerate(specs.disks):
            devices.append((f"virtio-blk{n}", _open_disk(disk, compiled_blk)))
        for n, net in enumerate(specs.nets):
            devices.append((f"virtio-net{n}", _open_net(net, loop)))
        if specs.console:
            from devices.virtio.console import VirtioConsole

            result.console = VirtioConsole(board.console_write, loop, board.console_room_available)
            devices.append(("virtio-console", result.console))
        if specs.rng:
            from devices.virtio.rng import VirtioRng

            devices.append(("virtio-rng", VirtioRng()))
        if specs.filesystems:
            raise_open_file_limit()
        for n, fs in enumerate(specs.filesystems):
            devices.append((f"virtio-fs{n}", _open_fs(fs)))
        devices.extend(specs.prebuilt)
        for index, (name, device) in enumerate(devices):
            where = mmio.window(index)
            transport = mmio.VirtioMmioTransport(device, board.memory, _irq_line(vm, where.gsi, irqchip), name)
            board.mmio.register(where.base, where.size, transport, name)
            _add_notifiers(vm, transport, where.base, loop)
            result.transports.append(transport)
            result.windows.append(where)
            board.acpi.append(mmio.acpi_description(index, where))
        if result.console is not None:
            board.console_input = console_input_route(board, result.console)
    except BaseException:
        for _, device in devices:
            device.close()
        loop.stop()
        raise
    return result


def console_input_route(board: Board, console: VirtioConsole) -> Callable[[bytes], int]:
    """Where typed input goes once virtio-console has the host console (--console virtio).

    To hvc0 once the guest's driver has the port up (it has written to it).
    Until then, at a terminal, to the serial port if the guest has written
    there: a person types to what they see, and a guest without the driver
    (or before it loads it) can be used on ttyS0 as with --console serial.
    One notice says so the first time. Otherwise (nothing on the serial
    port yet, or input from a pipe or a file, which is meant for hvc0) input
    waits for hvc0.
    """
    serial_receive = board.console_input
    if not board.console_interactive or serial_receive is None:
        return console.receive
    told = False

    def receive(data: bytes) -> int:
        nonlocal told
        if console.takes_input() or not board.serial_in_use():
            return console.receive(data)
        if not told:
            told = True
            board.console_notice("the guest has not set up virtio-console (hvc0) yet: "
                                 "what you type goes to the serial port (ttyS0) until it has")
        return serial_receive(data)

    return receive


def raise_open_file_limit() -> None:
    """Let the process hold as many fds as the hard limit allows: the FUSE server
    keeps one for every host file the guest has looked up and not forgotten."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _irq_line(vm, gsi: int, irqchip: bool) -> IrqLine:
    if not irqchip:
        return NullIrqLine()
    eventfd = vm.irq_eventfd(gsi)
    return vm.irq_line(gsi) if eventfd is None else IrqfdLine(eventfd)


def _add_notifiers(vm, transport: mmio.VirtioMmioTransport, base: int, loop: IoLoop) -> None:
    for index in range(len(transport.queues)):
        fd = vm.notifier(base + mmio.QUEUE_NOTIFY, 4, index)
        if fd is None:
            return  # no ioeventfd: QueueNotify writes arrive on the bus as MMIO exits

        def kicked(fd=fd, index=index) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            transport.notify(index)

        loop.add_reader(fd, kicked)
