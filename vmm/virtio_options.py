"""The virtio options of `pyvmm boot`, parsed into specs (bad input is a one-line PyvmmError).

    --disk PATH[,format=raw|qcow2][,readonly=on][,serial=ID]     (repeatable)
    --net tap=NAME[,mac=52:54:00:..]                              (repeatable)
    --net socket=listen:PATH|connect:PATH[,mac=..]
    --console virtio        the host console talks to hvc0 instead of ttyS0
    --rng                   virtio-rng fed from the host's random source
    --fs DIR,tag=TAG[,readonly=on]                                (repeatable)

Only parsing lives here, so the CLI and MachineConfig do not load the device
models; vmm/virtio_setup.py builds the devices from these specs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from devices.virtio.constants import BLK_ID_BYTES, FS_TAG_BYTES
from vmm.errors import PyvmmError

_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}


class DiskSpec(NamedTuple):
    path: str
    format: str | None = None  # None: probe (a qcow2 header, else raw)
    readonly: bool = False
    serial: str = ""
    # Where firmware tries it, lowest first (QEMU's bootindex); None: after those
    # that have one, in virtio-mmio window order (SeaBIOS boots only the first disk).
    bootindex: int | None = None


class NetSpec(NamedTuple):
    tap: str | None = None
    socket_mode: str | None = None  # "listen" or "connect"
    socket_path: str | None = None
    mac: bytes | None = None  # None: random, 52:54:00:xx:xx:xx


class FsSpec(NamedTuple):
    path: str
    tag: str
    readonly: bool = False
    hidden: tuple[str, ...] = ()  # host directories shown empty (vmm/fuse/server.py)


@dataclass
class VirtioSpecs:
    disks: list[DiskSpec] = field(default_factory=list)
    nets: list[NetSpec] = field(default_factory=list)
    console: bool = False  # --console virtio
    rng: bool = False
    filesystems: list[FsSpec] = field(default_factory=list)
    # Devices built by the caller, as (name, VirtioDevice) (pyvmm run's stdio share).
    prebuilt: list[tuple[str, object]] = field(default_factory=list)
    # Also describe the devices on the kernel command line (virtio_mmio.device=),
    # for kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and without ACPI.
    cmdline_devices: bool = False

    @property
    def count(self) -> int:
        return (len(self.disks) + len(self.nets) + int(self.console) + int(self.rng) + len(self.filesystems)
                + len(self.prebuilt))


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
    if len(serial.encode()) > BLK_ID_BYTES or not serial.isprintable() or not serial.isascii():
        raise PyvmmError(f"--disk {text}: serial must be at most {BLK_ID_BYTES} printable ASCII characters")
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


def parse_fs(text: str) -> FsSpec:
    """'DIR,tag=TAG[,readonly=on]' -> FsSpec."""
    path, values = _options(text, "--fs")
    if not path:
        raise PyvmmError(f"--fs {text}: the directory comes first")
    unknown = set(values) - {"tag", "readonly"}
    if unknown:
        raise PyvmmError(f"--fs {text}: unknown option {sorted(unknown)[0]!r} (known: tag, readonly)")
    tag = values.get("tag", "")
    if not tag or len(tag.encode()) > FS_TAG_BYTES or not tag.isprintable():
        raise PyvmmError(f"--fs {text}: tag=TAG is needed, 1 to {FS_TAG_BYTES} printable bytes")
    readonly = _flag(values["readonly"], "--fs", "readonly") if "readonly" in values else False
    return FsSpec(path, tag, readonly)


def parse_console(text: str) -> bool:
    """'serial' or 'virtio' -> whether the host console is the virtio console."""
    if text not in ("serial", "virtio"):
        raise PyvmmError(f"--console {text}: use serial or virtio")
    return text == "virtio"


# -- building ------------------------------------------------------------------------------
