"""The machine's virtio devices: option parsing and the one call the machine builder makes.

    --disk PATH[,format=raw|qcow2][,readonly=on][,serial=ID]     (repeatable)
    --net tap=NAME[,mac=52:54:00:..]                              (repeatable)
    --net socket=listen:PATH|connect:PATH[,mac=..]
    --console virtio        the host console talks to hvc0 instead of ttyS0
    --rng                   virtio-rng fed from the host's random source

`parse_disk` / `parse_net` turn the option strings into specs (bad input is
a one-line `PyvmmError`). `add_virtio_devices()` opens the backends, puts a
virtio-mmio window per device on the MMIO bus at layout.VIRTIO_MMIO_BASE
(one page each) with GSI layout.VIRTIO_MMIO_IRQ_BASE + n, and returns a
`VirtioDevices` whose `windows` go to the DSDT (boot/acpi) and whose
`start()` / `close()` bracket the machine's run.

Where the work runs: on KVM each queue's QueueNotify has an ioeventfd and
each device's interrupt an irqfd with resampling, so requests are served on
the I/O thread (devices/virtio/io_loop.py) and the vCPU never exits for a
kick. Elsewhere (the software CPU) the kick is an MMIO write handled on the
vCPU thread, and the interrupt goes through `vm.irq_line`. Host input
(packets, the socket peer) is always read on the I/O thread.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from boot.acpi.dsdt import VirtioMmioWindow
from devices.base import NullIrqLine
from devices.virtio import mmio as registers
from devices.virtio.blk import ID_BYTES, VirtioBlock
from devices.virtio.console import VirtioConsole
from devices.virtio.eventfd_irq import ResamplingIrqLine
from devices.virtio.io_loop import IoLoop
from devices.virtio.mmio import VirtioMmioTransport
from devices.virtio.net import VirtioNet
from devices.virtio.net_backends import NetBackend, SocketBackend, TapBackend
from devices.virtio.rng import VirtioRng
from vmm import layout
from vmm.errors import PyvmmError

log = logging.getLogger(__name__)

_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


@dataclass(frozen=True)
class DiskSpec:
    path: str
    format: str | None = None  # None: probe (a qcow2 header, else raw)
    readonly: bool = False
    serial: str = ""


@dataclass(frozen=True)
class NetSpec:
    tap: str | None = None
    socket_mode: str | None = None  # "listen" or "connect"
    socket_path: str | None = None
    mac: bytes | None = None  # None: random, 52:54:00:xx:xx:xx


@dataclass
class VirtioSpecs:
    disks: list[DiskSpec] = field(default_factory=list)
    nets: list[NetSpec] = field(default_factory=list)
    console: bool = False  # --console virtio
    rng: bool = False
    # Also describe the devices on the kernel command line (virtio_mmio.device=),
    # for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and without ACPI.
    cmdline_devices: bool = False

    @property
    def count(self) -> int:
        return len(self.disks) + len(self.nets) + int(self.console) + int(self.rng)


# -- option parsing ---------------------------------------------------------------------


def _options(text: str, option: str) -> tuple[str, dict[str, str]]:
    first, *rest = text.split(",")
    values: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PyvmmError(f"{option} {text}: expected KEY=VALUE, got {item!r}")
        if key in values:
            raise PyvmmError(f"{option} {text}: {key} given twice")
        values[key] = value
    return first, values


def _flag(value: str, option: str, key: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise PyvmmError(f"{option}: {key}={value} should be on or off")


def parse_disk(text: str) -> DiskSpec:
    """'PATH[,format=raw|qcow2][,readonly=on][,serial=ID]' -> DiskSpec."""
    path, values = _options(text, "--disk")
    if not path:
        raise PyvmmError(f"--disk {text}: the image path comes first")
    unknown = set(values) - {"format", "readonly", "serial"}
    if unknown:
        raise PyvmmError(f"--disk {text}: unknown option {sorted(unknown)[0]!r} "
                         "(known: format, readonly, serial)")
    fmt = values.get("format")
    if fmt is not None and fmt not in ("raw", "qcow2"):
        raise PyvmmError(f"--disk {text}: format must be raw or qcow2")
    serial = values.get("serial", "")
    if len(serial.encode()) > ID_BYTES or not serial.isprintable() or not serial.isascii():
        raise PyvmmError(f"--disk {text}: serial must be at most {ID_BYTES} printable ASCII characters")
    readonly = _flag(values["readonly"], "--disk", "readonly") if "readonly" in values else False
    return DiskSpec(path, fmt, readonly, serial)


def parse_mac(text: str) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise PyvmmError(f"--net mac={text}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise PyvmmError(f"--net mac={text}: that is a multicast address (first byte must be even)")
    return mac


def parse_net(text: str) -> NetSpec:
    """'tap=NAME[,mac=..]' or 'socket=listen:PATH|connect:PATH[,mac=..]' -> NetSpec."""
    _, values = _options("," + text, "--net")
    unknown = set(values) - {"tap", "socket", "mac"}
    if unknown:
        raise PyvmmError(f"--net {text}: unknown option {sorted(unknown)[0]!r} (known: tap, socket, mac)")
    mac = parse_mac(values["mac"]) if "mac" in values else None
    if ("tap" in values) == ("socket" in values):
        raise PyvmmError(f"--net {text}: give exactly one of tap=NAME or socket=listen:PATH|connect:PATH")
    if "tap" in values:
        if not values["tap"]:
            raise PyvmmError("--net tap=NAME: the TAP device name is missing")
        return NetSpec(tap=values["tap"], mac=mac)
    mode, sep, path = values["socket"].partition(":")
    if mode not in ("listen", "connect") or not sep or not path:
        raise PyvmmError(f"--net {text}: socket=listen:PATH or socket=connect:PATH")
    return NetSpec(socket_mode=mode, socket_path=path, mac=mac)


def parse_console(text: str) -> bool:
    """'serial' or 'virtio' -> whether the host console is the virtio console."""
    if text not in ("serial", "virtio"):
        raise PyvmmError(f"--console {text}: use serial or virtio")
    return text == "virtio"


# -- building ------------------------------------------------------------------------------


@dataclass
class VirtioDevices:
    windows: list[VirtioMmioWindow]
    transports: list[VirtioMmioTransport]
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
        return [f"virtio_mmio.device={w.size // 1024}K@{w.base:#x}:{w.irq}" for w in self.windows]

    def stats_lines(self) -> list[str]:
        lines = []
        for transport, window in zip(self.transports, self.windows, strict=True):
            device = transport.device
            counters = {name: getattr(device, name) for name in
                        ("requests", "errors", "rx_packets", "tx_packets", "rx_dropped", "bytes_served")
                        if hasattr(device, name)}
            shown = ", ".join(f"{name} {value}" for name, value in counters.items())
            needs_reset = f", {transport.errors} device errors" if transport.errors else ""
            lines.append(f"  {transport.name} at {window.base:#x} gsi {window.irq}: {shown}{needs_reset}")
        return lines


def _open_net_backend(spec: NetSpec) -> NetBackend:
    if spec.tap is not None:
        return TapBackend(spec.tap)
    return SocketBackend(spec.socket_mode, spec.socket_path)


def _open_disk(spec: DiskSpec) -> VirtioBlock:
    from vmm.image.open import open_image

    if not os.path.exists(spec.path):
        raise PyvmmError(f"--disk {spec.path}: no such file")
    image = open_image(spec.path, spec.format, readonly=spec.readonly)
    if image.size % 512:
        image.close()
        raise PyvmmError(f"--disk {spec.path}: size {image.size} is not a multiple of 512 bytes")
    return VirtioBlock(image, serial=spec.serial, readonly=spec.readonly)


def add_virtio_devices(io, memory, vm, specs: VirtioSpecs, *, irqchip: bool,
                       console_writer: Callable[[bytes], object] | None = None,
                       console_room_available: Callable[[], object] = lambda: None) -> VirtioDevices:
    """Create the devices `specs` asks for and register them on `io.mmio`.

    `vm` is the accelerator's VirtualMachine (for irq lines, ioeventfds and
    irqfds); `irqchip` says whether the machine has interrupt controllers.
    `console_writer` is where virtio-console output goes (the host console).
    """
    if specs.count > layout.VIRTIO_MMIO_MAX_DEVICES:
        raise PyvmmError(f"{specs.count} virtio devices requested; pyvmm supports "
                         f"{layout.VIRTIO_MMIO_MAX_DEVICES} (one per free interrupt line)")
    loop = IoLoop()
    result = VirtioDevices([], [], loop)
    devices: list[tuple[str, object]] = []
    try:
        for n, disk in enumerate(specs.disks):
            devices.append((f"virtio-blk{n}", _open_disk(disk)))
        for n, net in enumerate(specs.nets):
            devices.append((f"virtio-net{n}", VirtioNet(_open_net_backend(net), net.mac, loop)))
        if specs.console:
            result.console = VirtioConsole(console_writer or (lambda data: None), console_room_available)
            devices.append(("virtio-console", result.console))
        if specs.rng:
            devices.append(("virtio-rng", VirtioRng()))
        for index, (name, device) in enumerate(devices):
            base = layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE
            gsi = layout.VIRTIO_MMIO_IRQ_BASE + index
            irq, resampling = _irq_line(vm, gsi, irqchip, loop)
            transport = VirtioMmioTransport(device, memory, irq, name)
            if resampling is not None:
                resampling.still_pending = lambda t=transport: t.interrupt_pending
            io.mmio.register(base, layout.VIRTIO_MMIO_SIZE, transport, name)
            _add_notifiers(vm, transport, base, loop)
            result.transports.append(transport)
            result.windows.append(VirtioMmioWindow(base, layout.VIRTIO_MMIO_SIZE, gsi))
    except BaseException:
        for _, device in devices:
            device.close()
        loop.stop()
        raise
    return result


def _irq_line(vm, gsi: int, irqchip: bool, loop: IoLoop):
    if not irqchip:
        return NullIrqLine(), None
    fds = vm.irq_eventfds(gsi)
    if fds is None:
        return vm.irq_line(gsi), None
    line = ResamplingIrqLine(*fds, loop)
    return line, line


def _add_notifiers(vm, transport: VirtioMmioTransport, base: int, loop: IoLoop) -> None:
    for index in range(len(transport.queues)):
        fd = vm.notifier(base + registers.QUEUE_NOTIFY, 4, index)
        if fd is None:
            return  # no ioeventfd: QueueNotify writes arrive on the bus as MMIO exits

        def kicked(fd=fd, index=index) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            transport.notify(index)

        loop.add_reader(fd, kicked)
