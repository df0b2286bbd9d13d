"""Inside L1: the Debian kernel held for gdb on the real KVM, its stub reached from the host over a serial line.

The host's gdb cannot reach a socket inside L1, so test_gdb_linux_kvm.py
gives L1 a second serial port wired to a QEMU chardev socket on the host.
Here, in L1, `pyvmm boot -S --gdb unix:SOCKET --accel kvm` holds the guest,
and a relay copies bytes between that serial port (set raw: gdb's packets
pass byte for byte) and pyvmm's socket. Meanwhile the guest's console is
watched like a person at a terminal: once its shell prompt shows (gdb has
continued it through the boot), its kernel warnings are listed and the shell
is set sleeping in a loop, so the guest goes on running in and out of its
kernel, until the debugger ends the VM.

    python -m tests.nested.gdb_in_l1 SERIAL_DEVICE SOCKET

prints READY once the host's gdb can connect, SLEEPING once the loop is
typed, the guest's console and pyvmm's stderr at the end, and exits with
pyvmm's status.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import threading
import time
import tty

from tests.assets import find_linux_assets
from tests.boot.kernel_symbols import NOKASLR_CMDLINE
from tests.boot.session import PROMPT, GuestSession

READY = "pyvmm-l1-gdb: relay ready"
WARNING = "pyvmm-l1-gdb: guest warning: "
SLEEPING = "pyvmm-l1-gdb: the guest's shell sleeps in a loop"
CONNECT_TIMEOUT = 120.0
# The whole guest run, paused at gdb's stops included; L1 itself is on a
# software CPU, so generously.
GUEST_TIMEOUT = 600.0


def raw_serial(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attributes = termios.tcgetattr(fd)
    attributes[4] = attributes[5] = termios.B115200  # ispeed, ospeed: QEMU's UART ignores them
    termios.tcsetattr(fd, termios.TCSANOW, attributes)
    return fd


def connect(path: str, process) -> socket.socket:
    """pyvmm's gdb socket, once it listens (pyvmm creates it at start-up)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(path)
            return connection
        except (FileNotFoundError, ConnectionRefusedError):
            connection.close()
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pyvmm never listened on {path} (status {process.poll()})") from None
            time.sleep(0.2)


def relay(serial: int, connection: socket.socket) -> None:
    """Bytes both ways until pyvmm hangs up (the serial line never does)."""
    while True:
        ready, _, _ = select.select([serial, connection], [], [])
        if serial in ready:
            connection.sendall(os.read(serial, 4096))
        if connection in ready:
            data = connection.recv(4096)
            if not data:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(serial, view):]


def main() -> int:
    device, path = sys.argv[1:3]
    assets = find_linux_assets()
    session = GuestSession("--kernel", str(assets.kernel), "--initrd", str(assets.initrd), "--accel", "kvm",
                           "--gdb", f"unix:{path}", "-S", "--cmdline", NOKASLR_CMDLINE, timeout=GUEST_TIMEOUT)
    try:
        connection = connect(path, session.process)
        # Opened only now: opening the port clears its FIFO, so the host waits for READY to send.
        serial = raw_serial(device)
        threading.Thread(target=relay, args=(serial, connection), daemon=True).start()
        print(READY, flush=True)
        session.expect(PROMPT)
        for line in session.run("dmesg | grep WARNING:").strip().splitlines():
            print(f"{WARNING}{line}", flush=True)
        session.send("while sleep 1; do :; done")
        print(SLEEPING, flush=True)
        status, stderr = session.wait(GUEST_TIMEOUT)
    finally:
        print(f"pyvmm-l1-gdb: guest console:\n{session.output.decode(errors='replace')}", flush=True)
        session.close()
    print(f"pyvmm-l1-gdb: pyvmm stderr:\n{stderr}pyvmm-l1-gdb: pyvmm status {status}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
