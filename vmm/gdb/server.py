"""The gdb stub's socket: one debugger at a time, served on its own thread.

The listening socket is opened before the VM starts (so a port in use is
one line on stderr, not a half-started VM). One thread accepts and serves
connections in turn; it waits in `select` on the connection and on the
debugger's `wake_fd` (a stop to report, or the VM's end). A second
debugger while one is attached gets one error packet saying so and is
disconnected. When gdb detaches or goes away, every breakpoint is removed
and the guest runs on; when gdb kills, the VM ends.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading

from vmm import exit_status
from vmm.accel import Vcpu, VirtualMachine
from vmm.errors import PyvmmError, report
from vmm.gdb.debugger import Debugger
from vmm.gdb.options import GdbAddress, GdbSpec
from vmm.gdb.packets import Ack, Interrupt, Packet, PacketReader, frame
from vmm.gdb.session import ERROR_ARGUMENT, ERROR_REFUSED, PACKET_SIZE, Session
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

ALREADY_ATTACHED = b"E.a debugger is already attached to this VM"
REFUSAL_TIMEOUT = 2.0  # how long a refused second debugger gets to send its first packet


def open_gdb_stub(spec: GdbSpec, vm: VirtualMachine, vcpus: list[Vcpu], memory: GuestMemory,
                  stop: StopController) -> GdbServer:
    """Listen on the spec's address (raises PyvmmError); with -S the vCPUs are held from now on."""
    debugger = Debugger(vm, vcpus, memory, stop, paused=spec.paused)
    try:
        return GdbServer(spec.address, debugger)
    except BaseException:
        debugger.close()
        raise


class GdbServer:
    def __init__(self, address: GdbAddress, debugger: Debugger) -> None:
        self.address = address
        self.debugger = debugger
        self.listener = _listen(address)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve_forever, name="gdb", daemon=True)
        self._closed = False

    def start(self) -> None:
        if self.debugger.support.notice:
            report(f"gdb: {self.debugger.support.notice}")
        if self.debugger.paused_at_start:
            report(f"gdb: waiting for a debugger on {self.bound_address} (-S: the guest starts when it continues)")
        self._thread.start()

    @property
    def bound_address(self) -> GdbAddress:
        """Where it listens (a TCP port 0 asks the kernel for a free one)."""
        if self.address.path is not None:
            return self.address
        return GdbAddress(host=self.address.host, port=self.listener.getsockname()[1])

    def close(self) -> None:
        """Stop serving (from the main thread, at shutdown) and release the socket."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        self._thread.join(5.0)
        self.listener.close()
        if self.address.path is not None:
            try:
                os.unlink(self.address.path)
            except OSError:
                pass
        os.close(self._stop_r)
        os.close(self._stop_w)
        self.debugger.close()

    # -- the serving thread ----------------------------------------------------------------

    def _serve_forever(self) -> None:
        while True:
            ready, _, _ = select.select([self.listener, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                connection, peer = self.listener.accept()
            except OSError:
                continue
            log.info("gdb: debugger connected from %s", peer or "a unix socket")
            if connection.family != socket.AF_UNIX:
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small packet per step
            try:
                if self._serve(connection) == "closing":
                    return
            except OSError as err:
                log.info("gdb: connection lost: %s", err)
            finally:
                connection.close()
                self.debugger.detach()

    def _refuse(self, connection: socket.socket) -> None:
        """A second debugger: answer its first packet with an error that says why, then hang up."""
        report("gdb: refused a second debugger connection (one is attached)")
        try:
            connection.settimeout(REFUSAL_TIMEOUT)
            reader = PacketReader(PACKET_SIZE)
            while True:
                data = connection.recv(4096)
                if not data or any(isinstance(e, Packet) for e in reader.feed(data)):
                    break
            connection.sendall(b"+" + frame(ALREADY_ATTACHED))
        except OSError:
            pass
        finally:
            connection.close()

    def _serve(self, connection: socket.socket) -> str:
        """One debugger until it goes away ("done") or pyvmm shuts down ("closing")."""
        debugger = self.debugger
        session = Session(debugger)
        session.last_stop = debugger.stop()  # gdb expects a stopped target when it connects
        reader = PacketReader(PACKET_SIZE)
        running = False
        last_reply = b""

        def send(reply: bytes) -> None:
            nonlocal last_reply
            last_reply = frame(reply)
            connection.sendall(last_reply)

        while True:
            ready, _, _ = select.select([connection, debugger.wake_fd, self._stop_r, self.listener], [], [])
            if self.listener in ready:
                try:
                    self._refuse(self.listener.accept()[0])
                except OSError:
                    pass
            if debugger.wake_fd in ready:
                try:
                    os.eventfd_read(debugger.wake_fd)
                except BlockingIOError:
                    pass
                event = debugger.take_stop()
                if event is not None and (running or event.exit_status is not None):
                    running = False
                    send(session.stop_reply(event))
                    if event.exit_status is not None:
                        return "done"
            if self._stop_r in ready:
                return "closing"
            if connection not in ready:
                continue
            data = connection.recv(65536)
            if not data:
                return "done"
            for event in reader.feed(data):
                if isinstance(event, Interrupt):
                    if running:
                        debugger.interrupt()
                    continue
                if isinstance(event, Ack):
                    if not event.positive and last_reply and not session.no_ack:
                        connection.sendall(last_reply)
                    continue
                if not session.no_ack:
                    connection.sendall(b"+" if event.valid else b"-")
                if not event.valid:
                    continue
                if running:
                    log.info("gdb: packet while the guest runs ignored: %r", event.payload[:40])
                    continue
                reply = ERROR_ARGUMENT if event.oversized else self._handle(session, event.payload)
                if session.killed:
                    debugger.stop_controller.request_stop(exit_status.INTERRUPTED, "killed by the debugger",
                                                          by_host=True)
                    return "done"
                if reply is None:
                    running = True
                    continue
                send(reply)
                if session.detached:
                    return "done"


    @staticmethod
    def _handle(session: Session, payload: bytes) -> bytes | None:
        try:
            return session.handle(payload)
        except Exception:  # noqa: BLE001 - a bug here must not leave gdb and a paused guest hanging
            log.exception("gdb: handling %r failed", payload[:40])
            return ERROR_REFUSED


def _listen(address: GdbAddress) -> socket.socket:
    if address.path is not None:
        if os.path.exists(address.path):
            raise PyvmmError(f"--gdb {address}: {address.path} exists already")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        listener = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address.path if address.path is not None else (address.host, address.port))
        listener.listen(2)
    except OSError as err:
        listener.close()
        raise PyvmmError(f"--gdb {address}: cannot listen: {err.strerror or err}") from None
    return listener
