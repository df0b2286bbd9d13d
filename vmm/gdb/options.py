"""The gdb stub's command-line options, spelled as QEMU spells them, for every command that boots.

    --gdb tcp:[HOST]:PORT | unix:PATH    listen for gdb (HOST defaults to 127.0.0.1)
    -s                                   --gdb tcp:127.0.0.1:1234
    -S, --paused                         hold every vCPU before its first instruction

`gdb_options` adds them to a click command; `gdb_spec` turns their values
into a `GdbSpec` (None when no debugger was asked for).
"""

from __future__ import annotations

from typing import NamedTuple

import click

from vmm.errors import PyvmmError

DEFAULT_HOST = "127.0.0.1"  # loopback: a debugger can read and write all guest memory
DEFAULT_PORT = 1234


class GdbAddress(NamedTuple):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    path: str | None = None  # a unix socket instead

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


class GdbSpec(NamedTuple):
    address: GdbAddress
    paused: bool = False


def parse_gdb_address(text: str) -> GdbAddress:
    """`tcp:[HOST]:PORT` (also `:PORT` and a bare `PORT`, as QEMU takes them) or `unix:PATH`."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise PyvmmError("--gdb unix:PATH needs a path")
        return GdbAddress(path=path)
    rest = text[len("tcp:"):] if text.startswith("tcp:") else text
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address
    elif ":" in host:
        host = "?"  # not a host: refused below
    # Port 0: any free port (printed with -S).
    if not port.isdigit() or not 0 <= int(port) < 65536 or host == "?" or any(c in host for c in "[]/ "):
        raise PyvmmError(f"--gdb {text}: expected tcp:[HOST]:PORT or unix:PATH")
    host = host or DEFAULT_HOST
    return GdbAddress(host=host, port=int(port))


def gdb_options(command):
    """Add --gdb, -s and -S/--paused to a click command (its function takes gdb, s, paused)."""
    command = click.option("-S", "--paused", is_flag=True,
                           help="Hold every vCPU before its first instruction until the debugger continues.")(command)
    command = click.option("-s", "gdb_default", is_flag=True,
                           help=f"Shorthand for --gdb tcp:{DEFAULT_HOST}:{DEFAULT_PORT}.")(command)
    return click.option("--gdb", "gdb", metavar="tcp:[HOST]:PORT|unix:PATH",
                        help="Listen for gdb's remote protocol (host defaults to loopback).")(command)


def gdb_spec(gdb: str | None, gdb_default: bool, paused: bool) -> GdbSpec | None:
    if gdb is not None and gdb_default:
        raise PyvmmError("-s and --gdb exclude each other")
    if gdb is None and not gdb_default:
        if paused:
            raise PyvmmError("-S/--paused waits for a debugger: add -s or --gdb")
        return None
    address = parse_gdb_address(gdb) if gdb is not None else GdbAddress()
    return GdbSpec(address, paused)
