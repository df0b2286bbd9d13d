"""One gdb connection's commands: packet payload in, reply payload out.

`Session.handle` parses one packet and acts on a `Target` (vmm/gdb/target.py;
the VM through vmm/gdb/debugger.py, or a fake in the unit tests). It never
raises on what gdb sends: a malformed packet gets an `Enn` error, an unknown
one the empty reply that tells gdb "not supported" (gdb manual, "Packets").
A resume (`c`, `s`, `vCont`) has no reply until the target stops; the
server then sends `stop_reply()`.

Threads are vCPUs, numbered from 1 (gdb reserves 0 for "any" and -1 for
"all"). All-stop: when one vCPU stops, every vCPU is stopped before gdb
hears of it, and a resume lets each named vCPU continue or step.
"""

from __future__ import annotations

import logging
import re

from vmm.gdb import registers
from vmm.gdb.packets import unescape
from vmm.gdb.target import ACTIONS, MemoryFault, Refused, StopEvent, Target

log = logging.getLogger(__name__)

PACKET_SIZE = 0x4000  # the largest packet we accept, announced in qSupported
SIGINT, SIGTRAP = 2, 5
ERROR_ARGUMENT = b"E16"  # EINVAL
ERROR_MEMORY = b"E0e"  # EFAULT
ERROR_REFUSED = b"E01"
# Z/z types: 0 software breakpoint, 1 hardware breakpoint, 2 write, 3 read, 4 access watchpoint.
POINT_KINDS = {0: "software", 1: "hardware", 2: "write", 3: "read", 4: "access"}
_HEX = re.compile(rb"^[0-9a-fA-F]+$")


class BadPacket(ValueError):
    """A packet gdb (or whoever is on the socket) sent malformed."""


def parse_hex(field: bytes) -> int:
    if not _HEX.match(field) or len(field) > 32:
        raise BadPacket(f"not a hex number: {field[:32]!r}")
    return int(field, 16)


def parse_thread(field: bytes) -> int:
    """A thread id: positive, 0 (any) or -1 (all)."""
    if field == b"-1":
        return -1
    return parse_hex(field)


class Session:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.no_ack = False
        self.gdb_features: set[str] = set()
        self.general_thread = target.threads()[0]  # Hg: registers and memory
        self.resume_thread = -1  # Hc: what the old-style c and s apply to
        self.last_stop: StopEvent | None = None
        self.detached = False
        self.killed = False

    # -- the dispatcher ---------------------------------------------------------

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet, or None when the target was resumed (reply when it stops)."""
        if not payload:
            return b""
        try:
            return self._dispatch(payload)
        except BadPacket as err:
            log.info("gdb: malformed packet %r: %s", payload[:40], err)
            return ERROR_ARGUMENT
        except MemoryFault:
            return ERROR_MEMORY
        except Refused as err:
            log.info("gdb: %s", err)
            return ERROR_REFUSED

    def _dispatch(self, payload: bytes) -> bytes | None:
        command, rest = payload[:1], payload[1:]
        simple = {
            b"?": self._query_stop, b"g": self._read_all_registers, b"G": self._write_all_registers,
            b"p": self._read_register, b"P": self._write_register, b"m": self._read_memory,
            b"M": self._write_memory, b"X": self._write_binary, b"H": self._set_thread,
            b"T": self._thread_alive, b"Z": self._insert_point, b"z": self._remove_point,
            b"c": self._continue, b"C": self._continue_signal, b"s": self._step, b"S": self._step_signal,
            b"D": self._detach, b"k": self._kill,
        }
        handler = simple.get(command)
        if handler is not None:
            return handler(rest)
        if command in (b"q", b"Q"):
            return self._query(payload)
        if payload.startswith(b"vCont"):
            return self._vcont(payload[5:])
        return b""  # unknown: "not supported"

    # -- queries ----------------------------------------------------------------

    def _query(self, payload: bytes) -> bytes:
        name, _, args = payload.partition(b":")
        if name == b"qSupported":
            self.gdb_features = {f[:-1].decode("ascii", "replace") for f in args.split(b";") if f.endswith(b"+")}
            features = [f"PacketSize={PACKET_SIZE:x}", "qXfer:features:read+", "QStartNoAckMode+",
                        "vContSupported+"]
            features += [f"{f}+" for f in ("swbreak", "hwbreak") if f in self.gdb_features]
            return ";".join(features).encode()
        if name == b"QStartNoAckMode":
            self.no_ack = True
            return b"OK"
        if name == b"qXfer" and args.startswith(b"features:read:"):
            return self._read_features(args[len(b"features:read:"):])
        if name == b"qAttached":
            return b"1"  # attached to an existing "process": detaching leaves it running
        if name == b"qC":
            return b"QC%x" % self.general_thread
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % t for t in self.target.threads())
        if name == b"qsThreadInfo":
            return b"l"
        if name.startswith(b"qThreadExtraInfo,"):
            thread = self._existing_thread(parse_thread(name[len(b"qThreadExtraInfo,"):]))
            return f"vCPU {thread - 1}".encode().hex().encode()
        return b""

    def _read_features(self, args: bytes) -> bytes:
        annex, _, span = args.partition(b":")
        offset, _, length = span.partition(b",")
        if annex != b"target.xml":
            return b"E00"
        start, length = parse_hex(offset), parse_hex(length)
        document = registers.target_xml()
        chunk = document[start:start + min(length, PACKET_SIZE - 8)]
        return (b"l" if start + len(chunk) >= len(document) else b"m") + chunk

    def _query_stop(self, _rest: bytes) -> bytes:
        if self.last_stop is None:
            self.last_stop = self.target.stop()
        return self.stop_reply(self.last_stop)

    def stop_reply(self, event: StopEvent) -> bytes:
        self.last_stop = event
        self.general_thread = event.thread
        if event.exit_status is not None:
            return b"W%02x" % (event.exit_status & 0xFF)
        signal = SIGINT if event.reason == "interrupt" else SIGTRAP
        reply = b"T%02xthread:%x;" % (signal, event.thread)
        if event.reason in ("watch", "rwatch", "awatch"):
            reply += b"%s:%x;" % (event.reason.encode(), event.address)
        elif event.reason == "swbreak" and "swbreak" in self.gdb_features:
            reply += b"swbreak:;"
        elif event.reason == "hwbreak" and "hwbreak" in self.gdb_features:
            reply += b"hwbreak:;"
        return reply

    # -- threads ----------------------------------------------------------------

    def _existing_thread(self, thread: int) -> int:
        if thread not in self.target.threads():
            raise BadPacket(f"no thread {thread}")
        return thread

    def _set_thread(self, rest: bytes) -> bytes:
        kind, thread = rest[:1], parse_thread(rest[1:])
        if kind not in (b"g", b"c"):
            raise BadPacket("H takes g or c")
        if thread > 0 and thread not in self.target.threads():
            return ERROR_REFUSED
        if kind == b"g":
            self.general_thread = thread if thread > 0 else self.target.threads()[0]
        else:
            self.resume_thread = thread
        return b"OK"

    def _thread_alive(self, rest: bytes) -> bytes:
        return b"OK" if parse_thread(rest) in self.target.threads() else ERROR_REFUSED

    # -- registers --------------------------------------------------------------

    def _read_all_registers(self, _rest: bytes) -> bytes:
        return registers.encode(self.target.registers(self.general_thread))

    def _write_all_registers(self, rest: bytes) -> bytes:
        try:
            values = registers.decode_all(rest)
        except ValueError as err:
            raise BadPacket(str(err)) from None
        # gdb sends every register back; only those that changed are written, and
        # none the target could not give in the first place.
        current = self.target.registers(self.general_thread)
        changed = {name: value for name, value in values.items()
                   if current.get(name) is not None and current[name] != value}
        self.target.write_registers(self.general_thread, changed)
        return b"OK"

    def _read_register(self, rest: bytes) -> bytes:
        number = parse_hex(rest)
        if number >= len(registers.REGISTERS):
            return ERROR_ARGUMENT
        return registers.encode(self.target.registers(self.general_thread), [number])

    def _write_register(self, rest: bytes) -> bytes:
        number, sep, value = rest.partition(b"=")
        if not sep:
            raise BadPacket("P needs n=value")
        try:
            name, decoded = registers.decode_one(parse_hex(number), value)
        except ValueError as err:
            raise BadPacket(str(err)) from None
        self.target.write_registers(self.general_thread, {name: decoded})
        return b"OK"

    # -- memory -----------------------------------------------------------------

    def _address_length(self, text: bytes) -> tuple[int, int]:
        address, sep, length = text.partition(b",")
        if not sep:
            raise BadPacket("expected ADDR,LENGTH")
        address, length = parse_hex(address), parse_hex(length)
        if address >> 64:
            raise BadPacket("address beyond 64 bits")
        return address, length

    def _read_memory(self, rest: bytes) -> bytes:
        address, length = self._address_length(rest)
        length = min(length, (PACKET_SIZE - 8) // 2)  # a shorter reply is allowed
        return self.target.read_memory(self.general_thread, address, length).hex().encode()

    def _write_memory(self, rest: bytes) -> bytes:
        span, sep, data = rest.partition(b":")
        address, length = self._address_length(span)
        if not sep or len(data) != 2 * length or (data and not _HEX.match(data)):
            raise BadPacket("M data does not match its length")
        self.target.write_memory(self.general_thread, address, bytes.fromhex(data.decode("ascii")))
        return b"OK"

    def _write_binary(self, rest: bytes) -> bytes:
        span, sep, data = rest.partition(b":")
        address, length = self._address_length(span)
        data = unescape(data)
        if not sep or len(data) != length:
            raise BadPacket("X data does not match its length")
        if length:
            self.target.write_memory(self.general_thread, address, data)
        return b"OK"

    # -- breakpoints and watchpoints ------------------------------------------------

    def _point(self, rest: bytes) -> tuple[str, int, int]:
        fields = rest.split(b";")[0].split(b",")
        if len(fields) != 3:
            raise BadPacket("expected TYPE,ADDR,KIND")
        kind = POINT_KINDS.get(parse_hex(fields[0]))
        if kind is None:
            raise BadPacket("unknown breakpoint type")
        address, length = parse_hex(fields[1]), parse_hex(fields[2])
        if address >> 64 or not 1 <= length <= 8:
            raise BadPacket("bad breakpoint address or length")
        return kind, address, length

    def _insert_point(self, rest: bytes) -> bytes:
        kind, address, length = self._point(rest)
        if not self.target.add_point(kind, address, length):
            return b""  # this kind is not supported at all: gdb falls back (software watchpoints)
        return b"OK"

    def _remove_point(self, rest: bytes) -> bytes:
        kind, address, length = self._point(rest)
        self.target.remove_point(kind, address, length)
        return b"OK"

    # -- running ----------------------------------------------------------------

    def _resume(self, actions: dict[int, str], address: bytes) -> None:
        if address:
            thread = next(iter(actions)) if len(actions) == 1 else self.general_thread
            self.target.write_registers(thread, {"rip": parse_hex(address)})
        self.last_stop = None
        self.target.resume(actions)

    def _old_style(self, action: str, address: bytes) -> None:
        threads = self.target.threads()
        if action == "c":
            actions = dict.fromkeys(threads, "c")
        else:  # step the Hc thread (or the current one); the others stay stopped
            thread = self.resume_thread if self.resume_thread > 0 else self.general_thread
            actions = {thread: "s"}
        self._resume(actions, address)

    def _continue(self, rest: bytes) -> None:
        self._old_style("c", rest)

    def _step(self, rest: bytes) -> None:
        self._old_style("s", rest)

    def _continue_signal(self, rest: bytes) -> None:
        parse_hex(rest.split(b";")[0])  # a signal to deliver: a VM has none, it just continues
        self._old_style("c", rest.partition(b";")[2])

    def _step_signal(self, rest: bytes) -> None:
        parse_hex(rest.split(b";")[0])
        self._old_style("s", rest.partition(b";")[2])

    def _vcont(self, rest: bytes) -> bytes | None:
        if rest == b"?":
            return b"vCont;c;C;s;S;t"
        if not rest.startswith(b";"):
            raise BadPacket("vCont needs actions")
        threads = self.target.threads()
        actions: dict[int, str] = {}
        for item in rest[1:].split(b";"):
            action, _, thread = item.partition(b":")
            letter = action[:1].decode("ascii", "replace").lower()
            if letter not in ACTIONS + "t" or (len(action) > 1 and action[:1] not in b"CS"):
                raise BadPacket(f"unknown vCont action {action!r}")
            if len(action) > 1:
                parse_hex(action[1:])  # the signal number: ignored, as for C and S
            targets = threads if not thread or parse_thread(thread) == -1 else [self._existing_thread(
                parse_thread(thread))]
            for t in targets:
                # The first action that applies to a thread is the one it takes.
                actions.setdefault(t, letter)
        actions = {t: a for t, a in actions.items() if a != "t"}
        if not actions:
            return b"OK"  # nothing resumes ("t" alone): all-stop threads are stopped already
        self._resume(actions, b"")
        return None

    def _detach(self, _rest: bytes) -> bytes:
        self.detached = True
        return b"OK"

    def _kill(self, _rest: bytes) -> None:
        self.killed = True
        return None
