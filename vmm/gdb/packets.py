"""GDB remote serial protocol framing: `$payload#cs` packets, acks and the interrupt byte.

A packet is `$`, the payload, `#` and two hex digits of the payload's
checksum (the sum of its bytes modulo 256). The receiver acknowledges each
packet with `+`, or asks for it again with `-`, until both sides agree on
`QStartNoAckMode`. Outside a packet the byte 0x03 is gdb's Ctrl-C.
In a payload `}` escapes the next byte (XOR 0x20), so a payload never holds
a bare `#` or `$`; gdb sends binary data (the `X` packet) that way.

`PacketReader` is fed whatever the socket gave and yields events; it never
holds more than `max_size` payload bytes, whatever the peer sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

INTERRUPT = 0x03
ESCAPE = 0x7D
ESCAPED_IN_REPLIES = frozenset(b"#$}*")


@dataclass(frozen=True)
class Packet:
    payload: bytes
    valid: bool  # the checksum matched
    oversized: bool = False  # longer than max_size; the payload kept is truncated


@dataclass(frozen=True)
class Interrupt:
    """gdb's Ctrl-C."""


@dataclass(frozen=True)
class Ack:
    positive: bool


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: bytes) -> bytes:
    """One reply packet, with the bytes the protocol reserves escaped."""
    escaped = bytearray()
    for byte in payload:
        if byte in ESCAPED_IN_REPLIES:
            escaped += bytes((ESCAPE, byte ^ 0x20))
        else:
            escaped.append(byte)
    return b"$" + bytes(escaped) + b"#" + f"{checksum(escaped):02x}".encode()


def unescape(data: bytes) -> bytes:
    """Binary data as gdb sent it in a packet (`}x` stands for x ^ 0x20)."""
    if ESCAPE not in data:
        return data
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == ESCAPE:
            escaped = True
        else:
            out.append(byte)
    return bytes(out)


class PacketReader:
    """Turns a byte stream from gdb into `Packet`, `Interrupt` and `Ack` events."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._state = "idle"  # idle, payload, checksum
        self._payload = bytearray()
        self._sum = 0
        self._oversized = False
        self._checksum_digits = bytearray()

    def feed(self, data: bytes) -> Iterator[Packet | Interrupt | Ack]:
        for byte in data:
            event = self._step(byte)
            if event is not None:
                yield event

    def _step(self, byte: int) -> Packet | Interrupt | Ack | None:
        if self._state == "idle":
            if byte == ord("$"):
                self._start()
            elif byte == INTERRUPT:
                return Interrupt()
            elif byte in b"+-":
                return Ack(byte == ord("+"))
            return None  # line noise between packets is ignored, as gdb does
        if self._state == "payload":
            if byte == ord("#"):
                self._state = "checksum"
            elif byte == ord("$"):
                self._start()  # a packet cut short: start over with the new one
            else:
                self._sum = (self._sum + byte) & 0xFF
                if len(self._payload) < self.max_size:
                    self._payload.append(byte)
                else:
                    self._oversized = True
            return None
        self._checksum_digits.append(byte)
        if len(self._checksum_digits) < 2:
            return None
        self._state = "idle"
        try:
            valid = int(self._checksum_digits.decode("ascii"), 16) == self._sum
        except ValueError:
            valid = False
        return Packet(bytes(self._payload), valid, self._oversized)

    def _start(self) -> None:
        self._state = "payload"
        self._payload.clear()
        self._sum = 0
        self._oversized = False
        self._checksum_digits.clear()
