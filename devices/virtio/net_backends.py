"""Where virtio-net's packets go on the host: a TAP device, or a unix socket to another pyvmm.

Every backend moves packets that start with the 12-byte virtio-net header
(`struct virtio_net_hdr_v1`, the header virtio 1.x always uses):

    receive() -> bytes | None   next packet for the guest, or None for now
    send(packet)                a packet from the guest (dropped if it cannot go out)
    pause_receive() / resume_receive()
                                the guest has no receive buffers / has some again;
                                while paused the backend stops reading its fd, so the
                                I/O loop does not spin and the host side queues or drops
    set_offloads(guest_features) the offloads the guest's driver accepted
    offload_features            virtio-net feature bits the backend can honour

`start(loop, ready)` hands the backend the I/O loop; it calls `ready()` on
the loop thread whenever packets may be waiting.

TAP (/dev/net/tun, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): the kernel reads and
writes the virtio-net header itself, so checksum and segmentation offloads
pass straight through; TUNSETOFFLOAD says which ones the guest can take.

Socket (listen:PATH / connect:PATH): a stream unix socket joining two
guests, no root needed. Each Ethernet frame travels as a 4-byte big-endian
length and the frame (the framing QEMU's socket netdev uses); no header, so
no offloads: each side hands the other complete frames with checksums.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable

from vmm.errors import PyvmmError

log = logging.getLogger(__name__)

NET_HEADER_SIZE = 12
# struct virtio_net_hdr_v1 with num_buffers = 1 and nothing else: a plain frame.
PLAIN_HEADER = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)
MAX_FRAME = 65536 + 14  # a 64 KiB GSO packet and its Ethernet header

# virtio-net feature bits that concern offloads (5.1.3).
F_CSUM = 0
F_GUEST_CSUM = 1
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
TAP_OFFLOAD_FEATURES = sum(1 << bit for bit in (
    F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN))

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFNAMSIZ = 16

Ready = Callable[[], object]


class NetBackend:
    offload_features = 0

    def start(self, loop, ready: Ready) -> None:
        raise NotImplementedError

    def receive(self) -> bytes | None:
        raise NotImplementedError

    def send(self, packet: bytes) -> None:
        raise NotImplementedError

    def pause_receive(self) -> None:
        raise NotImplementedError

    def resume_receive(self) -> None:
        raise NotImplementedError

    def set_offloads(self, guest_features: int) -> None:
        pass

    def close(self) -> None:
        raise NotImplementedError


class TapBackend(NetBackend):
    def __init__(self, name: str, tun_path: str = "/dev/net/tun") -> None:
        if not name or len(name.encode()) >= IFNAMSIZ:
            raise PyvmmError(f"--net tap={name}: a TAP device name has 1 to {IFNAMSIZ - 1} characters")
        self.name = name
        try:
            self.fd = os.open(tun_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            hint = {
                errno.ENOENT: " (load the tun module)",
                errno.EACCES: " (TAP networking needs root or CAP_NET_ADMIN; --net socket=... needs neither)",
            }.get(err.errno, "")
            raise PyvmmError(f"--net tap={name}: cannot open {tun_path}: {err.strerror}{hint}") from None
        try:
            request = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, request)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HEADER_SIZE))
        except OSError as err:
            os.close(self.fd)
            hint = {
                errno.EPERM: " (needs root or CAP_NET_ADMIN, or a TAP device made for your user: "
                             f"ip tuntap add {name} mode tap user $USER)",
                errno.EBUSY: " (another program is attached to it)",
                errno.EINVAL: " (is it a TUN device, or multi-queue?)",
            }.get(err.errno, "")
            raise PyvmmError(f"--net tap={name}: cannot attach to the TAP device: {err.strerror}{hint}") from None
        # Offer the guest the offloads this TAP accepts.
        self.offload_features = TAP_OFFLOAD_FEATURES if self._try_offloads(
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) else 0
        self._try_offloads(0)
        self._loop = None
        self._ready: Ready | None = None
        self._reading = False

    def _try_offloads(self, flags: int) -> bool:
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            return True
        except OSError:
            return False

    def set_offloads(self, guest_features: int) -> None:
        flags = 0
        if guest_features >> F_GUEST_CSUM & 1:
            # The kernel refuses TSO without checksum offload.
            flags |= TUN_F_CSUM
            if guest_features >> F_GUEST_TSO4 & 1:
                flags |= TUN_F_TSO4
            if guest_features >> F_GUEST_TSO6 & 1:
                flags |= TUN_F_TSO6
            if guest_features >> F_GUEST_ECN & 1 and flags & (TUN_F_TSO4 | TUN_F_TSO6):
                flags |= TUN_F_TSO_ECN
        if not self._try_offloads(flags):
            log.warning("TAP %s refused offloads %#x", self.name, flags)

    def start(self, loop, ready: Ready) -> None:
        self._loop, self._ready = loop, ready

    def pause_receive(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.fd)

    def resume_receive(self) -> None:
        if not self._reading and self._loop is not None:
            self._reading = True
            self._loop.add_reader(self.fd, self._ready)

    def receive(self) -> bytes | None:
        try:
            packet = os.read(self.fd, NET_HEADER_SIZE + MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            log.warning("TAP %s: read failed: %s", self.name, err.strerror)
            return None
        if len(packet) < NET_HEADER_SIZE:
            return None
        # No mergeable buffers: each packet fills exactly one chain (5.1.6.4).
        return packet[:10] + b"\x01\x00" + packet[NET_HEADER_SIZE:]

    def send(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except OSError:  # the TAP is down, or its queue is full: as a NIC would, drop
            pass

    def close(self) -> None:
        if self.fd >= 0:
            self.pause_receive()
            os.close(self.fd)
            self.fd = -1


class SocketBackend(NetBackend):
    """A unix stream socket to one peer, listening or connecting."""

    MAX_BUFFERED = 1 << 20  # bytes of frames waiting in either direction

    def __init__(self, mode: str, path: str) -> None:
        self.mode, self.path = mode, path
        self._lock = threading.Lock()  # the output buffer is shared by the guest's thread and the loop
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._inbound = bytearray()
        self._frames: collections.deque[bytes] = collections.deque()
        self._outbound = bytearray()
        self._paused = True
        self._reading_conn = False
        self._writing = False
        self._loop = None
        self._ready: Ready | None = None
        if mode == "listen":
            self._listen()
        elif mode == "connect":
            self._connect()
        else:
            raise PyvmmError(f"--net socket={mode}:{path}: use listen:PATH or connect:PATH")

    def _listen(self) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # left behind by an earlier run
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.path)
            listener.listen(1)
        except OSError as err:
            listener.close()
            raise PyvmmError(f"--net socket=listen:{self.path}: cannot listen: {err.strerror}") from None
        listener.setblocking(False)
        self._listener = listener

    def _connect(self) -> None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.connect(self.path)
        except OSError as err:
            conn.close()
            raise PyvmmError(f"--net socket=connect:{self.path}: cannot connect: {err.strerror} "
                             "(start the guest with listen:PATH first)") from None
        conn.setblocking(False)
        self._conn = conn

    # -- the loop side -------------------------------------------------------------

    def start(self, loop, ready: Ready) -> None:
        self._loop, self._ready = loop, ready
        if self._listener is not None:
            loop.add_reader(self._listener.fileno(), self._accept)
        self._update_reading()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._conn is not None:
            conn.close()  # one peer at a time
            return
        conn.setblocking(False)
        with self._lock:
            self._conn = conn
            self._inbound.clear()
            self._outbound.clear()
        self._reading_conn = self._writing = False
        self._update_reading()

    def _update_reading(self) -> None:
        conn = self._conn
        if conn is None or self._loop is None:
            return
        # While the guest takes no packets, keep reading until the buffer is
        # full; then stop, and the peer's socket fills up and drops.
        want = not self._paused or len(self._inbound) + sum(map(len, self._frames)) < self.MAX_BUFFERED
        if want == self._reading_conn:
            return
        self._reading_conn = want
        if want:
            self._loop.add_reader(conn.fileno(), self._on_readable)
        else:
            self._loop.remove_reader(conn.fileno())

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            data = conn.recv(256 << 10)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._disconnect("the peer closed the connection")
            return
        self._inbound += data
        while len(self._inbound) >= 4:
            length = int.from_bytes(self._inbound[:4], "big")
            if length > MAX_FRAME:
                self._disconnect(f"the peer sent a {length}-byte frame")
                return
            if len(self._inbound) < 4 + length:
                break
            self._frames.append(bytes(self._inbound[4 : 4 + length]))
            del self._inbound[: 4 + length]
        if self._frames and self._ready is not None:
            self._ready()
        self._update_reading()

    def _disconnect(self, why: str) -> None:
        log.info("net socket %s: %s", self.path, why)
        with self._lock:
            conn, self._conn = self._conn, None
            self._outbound.clear()
        if conn is not None:
            self._loop.remove_reader(conn.fileno())
            self._loop.remove_writer(conn.fileno())
            conn.close()
        self._reading_conn = self._writing = False
        self._inbound.clear()

    def _flush(self) -> None:
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                sent = conn.send(self._outbound)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = -1
            if sent > 0:
                del self._outbound[:sent]
            pending = bool(self._outbound) and sent >= 0
        if sent < 0:
            self._loop.call_soon(lambda: self._disconnect("sending failed"))
        elif pending != self._writing:
            # Wait for room only while something is left to send.
            self._writing = pending
            if pending:
                self._loop.add_writer(conn.fileno(), self._flush)
            else:
                self._loop.remove_writer(conn.fileno())

    # -- the device side ------------------------------------------------------------

    def pause_receive(self) -> None:
        if not self._paused:
            self._paused = True
            if self._loop is not None:
                self._loop.call_soon(self._update_reading)

    def resume_receive(self) -> None:
        if self._paused:
            self._paused = False
            if self._loop is not None:
                self._loop.call_soon(self._resumed)

    def _resumed(self) -> None:
        self._update_reading()
        if self._frames and not self._paused and self._ready is not None:
            self._ready()  # frames that arrived while the guest was not taking any

    def receive(self) -> bytes | None:
        try:
            frame = self._frames.popleft()
        except IndexError:
            return None
        return PLAIN_HEADER + frame

    def send(self, packet: bytes) -> None:
        frame = packet[NET_HEADER_SIZE:]
        with self._lock:
            if self._conn is None or len(self._outbound) + 4 + len(frame) > self.MAX_BUFFERED:
                return  # no peer, or the peer is not reading: the wire drops it
            self._outbound += len(frame).to_bytes(4, "big") + frame
        self._flush()

    def close(self) -> None:
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self._conn = self._listener = None
        if self.mode == "listen":
            try:
                os.unlink(self.path)
            except OSError:
                pass
