"""The gdb remote protocol without a VM: framing, the session's commands on a fake target, options."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ElementTree

import pytest

from vmm.errors import PyvmmError
from vmm.gdb import registers
from vmm.gdb.options import GdbAddress, gdb_spec, parse_gdb_address
from vmm.gdb.packets import Ack, Interrupt, Packet, PacketReader, checksum, frame, unescape
from vmm.gdb.session import PACKET_SIZE, Session
from vmm.gdb.target import MemoryFault, Refused, StopEvent, Target


class FakeTarget(Target):
    """Two threads, a page of memory at 0x1000, one debug register's worth of hardware points."""

    def __init__(self) -> None:
        self.regs = {1: {"rax": 1, "rip": 0x1000, "cr0": 0x80000011}, 2: {"rax": 2, "rip": 0x2000}}
        self.memory = bytearray(range(256)) * 16
        self.points: list[tuple[str, int, int]] = []
        self.resumed: list[dict[int, str]] = []
        self.stops = 0

    def threads(self):
        return [1, 2]

    def stop(self):
        self.stops += 1
        return StopEvent(1, "stopped")

    def resume(self, actions):
        self.resumed.append(actions)

    def registers(self, thread):
        return dict(self.regs[thread])

    def write_registers(self, thread, values):
        if "cs" in values:
            raise Refused("cs is read-only here")
        self.regs[thread].update(values)

    def read_memory(self, thread, address, length):
        if not 0x1000 <= address < 0x2000:
            raise MemoryFault()
        return bytes(self.memory[address - 0x1000:min(address - 0x1000 + length, 0x1000)])

    def write_memory(self, thread, address, data):
        if not (0x1000 <= address and address + len(data) <= 0x2000):
            raise MemoryFault()
        self.memory[address - 0x1000:address - 0x1000 + len(data)] = data

    def add_point(self, kind, address, length):
        if kind == "read":
            return False
        if kind == "hardware" and any(k == "hardware" for k, _, _ in self.points):
            raise Refused("all 1 debug registers are in use")
        self.points.append((kind, address, length))
        return True

    def remove_point(self, kind, address, length):
        self.points.remove((kind, address, length))


@pytest.fixture
def session():
    return Session(FakeTarget())


# -- framing -----------------------------------------------------------------------------------


def test_frame_escapes_reserved_bytes_and_checksums_what_is_sent():
    packet = frame(b"a#b$c}d*e")
    assert packet == b"$a}\x03b}\x04c}]d}\ne#" + f"{checksum(packet[1:-3]):02x}".encode()
    assert unescape(packet[1:-3]) == b"a#b$c}d*e"


def test_reader_splits_packets_acks_and_interrupts_across_reads():
    reader = PacketReader(64)
    stream = b"+" + frame(b"qSupported") + b"\x03-" + frame(b"g")
    events = [e for i in range(len(stream)) for e in reader.feed(stream[i:i + 1])]
    assert events == [Ack(True), Packet(b"qSupported", True), Interrupt(), Ack(False), Packet(b"g", True)]


def test_reader_flags_bad_checksums_and_oversized_packets_without_growing():
    reader = PacketReader(8)
    bad, = reader.feed(b"$g#00")
    assert bad == Packet(b"g", False)
    big, = reader.feed(frame(b"m" * 100))
    assert big.valid and big.oversized and len(big.payload) == 8
    notahex, = reader.feed(b"$g#zz")
    assert not notahex.valid


def test_reader_restarts_on_a_new_packet_inside_a_broken_one():
    reader = PacketReader(64)
    assert list(reader.feed(b"$qSupp$g#67")) == [Packet(b"g", True)]


def test_random_bytes_never_break_the_reader_or_the_session():
    rng = random.Random(17)
    reader = PacketReader(PACKET_SIZE)
    session = Session(FakeTarget())
    for _ in range(2000):
        data = bytes(rng.choice(b"$#}*+-\x03gGmMXpPZzHTqQvCcsSDk0123456789abcdef,:;=") for _ in range(rng.randint(1, 40)))
        for event in reader.feed(data):
            if isinstance(event, Packet):
                reply = session.handle(event.payload)
                assert reply is None or isinstance(reply, bytes)


# -- the session ---------------------------------------------------------------------------------


def test_qsupported_announces_packet_size_and_echoes_only_what_gdb_offers(session):
    reply = session.handle(b"qSupported:multiprocess+;swbreak+;xmlRegisters=i386")
    assert reply.split(b";") == [b"PacketSize=%x" % PACKET_SIZE, b"qXfer:features:read+", b"QStartNoAckMode+",
                                 b"vContSupported+", b"swbreak+"]
    assert session.handle(b"QStartNoAckMode") == b"OK" and session.no_ack


def test_target_description_is_valid_xml_listing_every_register_in_g_order(session):
    document = b""
    while True:
        reply = session.handle(b"qXfer:features:read:target.xml:%x,%x" % (len(document), 100))
        document += reply[1:]
        if reply.startswith(b"l"):
            break
    assert document == registers.target_xml()
    root = ElementTree.fromstring(document)
    regs = [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for r in root.iter("reg")]
    assert [(r.name, r.bits, n) for n, r in enumerate(registers.REGISTERS)] == regs
    features = {f.get("name") for f in root.iter("feature")}
    assert {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"} <= features
    assert session.handle(b"qXfer:features:read:other.xml:0,10") == b"E00"


def test_registers_g_p_and_writes(session):
    g = session.handle(b"g")
    assert len(g) == 2 * registers.G_PACKET_SIZE
    assert g.startswith(b"0100000000000000") and b"xx" in g  # rax = 1; what the target lacks is xx
    rip = registers.BY_NAME["rip"]
    assert session.handle(b"p%x" % rip) == b"0010000000000000"
    assert session.handle(b"P%x=3412000000000000" % rip) == b"OK"
    assert session.target.regs[1]["rip"] == 0x1234
    assert session.handle(b"P%x=0000" % registers.BY_NAME["cs"]) == b"E16"  # 2 bytes for a 4-byte register
    assert session.handle(b"P%x=00000000" % registers.BY_NAME["cs"]) == b"E01"  # refused by the target
    assert session.handle(b"p%x" % len(registers.REGISTERS)) == b"E16"
    full = session.handle(b"g")
    assert session.handle(b"G" + full.replace(b"xx", b"00")) == b"OK"  # gdb's zeros where we had nothing
    assert session.handle(b"G" + b"07" + full[2:]) == b"OK" and session.target.regs[1]["rax"] == 7
    assert session.handle(b"G" + full[:-2]) == b"E16"
    assert session.handle(b"G" + b"zz" + full[2:]) == b"E16"


def test_threads_and_h_select_whose_registers_are_read(session):
    assert session.handle(b"qfThreadInfo") == b"m1,2"
    assert session.handle(b"qsThreadInfo") == b"l"
    assert session.handle(b"Hg2") == b"OK"
    assert session.handle(b"g").startswith(b"0200000000000000")
    assert session.handle(b"qC") == b"QC2"
    assert session.handle(b"Hg3") == b"E01"
    assert session.handle(b"T2") == b"OK" and session.handle(b"T5") == b"E01"
    assert bytes.fromhex(session.handle(b"qThreadExtraInfo,2").decode()) == b"vCPU 1"
    assert session.handle(b"qAttached") == b"1"


def test_memory_reads_writes_and_faults(session):
    assert session.handle(b"m1000,4") == b"00010203"
    assert session.handle(b"m1ffe,8") == b"feff"  # a shorter reply up to the fault
    assert session.handle(b"m3000,4") == b"E0e"
    assert session.handle(b"M1000,2:abcd") == b"OK" and session.target.memory[:2] == b"\xab\xcd"
    assert session.handle(b"X1002,3:}\x03}\x04}]") == b"OK" and session.target.memory[2:5] == b"#$}"
    assert session.handle(b"M1fff,2:0000") == b"E0e"
    assert session.handle(b"X1000,0:") == b"OK"  # gdb's probe for X support
    assert len(session.handle(b"m1000,100000")) <= PACKET_SIZE  # clamped to what a reply can hold


def test_breakpoints_and_watchpoints(session):
    assert session.handle(b"Z0,1000,1") == b"OK"
    assert session.handle(b"Z1,1004,1") == b"OK"
    assert session.handle(b"Z1,1008,1") == b"E01"  # no debug register left
    assert session.handle(b"Z3,1010,4") == b""  # read watchpoints not supported: gdb falls back
    assert session.handle(b"Z2,1010,4") == b"OK"
    assert session.handle(b"Z4,1018,8") == b"OK"
    assert session.handle(b"Z9,1010,4") == b"E16"
    assert session.handle(b"Z2,1010,16") == b"E16"
    assert session.handle(b"z0,1000,1") == b"OK"
    assert session.handle(b"z4,1018,8") == b"OK"
    assert session.handle(b"Z4,1020,2") == b"OK"
    assert session.target.points == [("hardware", 0x1004, 1), ("write", 0x1010, 4), ("access", 0x1020, 2)]


def test_resume_packets_map_to_per_thread_actions(session):
    target = session.target
    assert session.handle(b"vCont?") == b"vCont;c;C;s;S;t"
    assert session.handle(b"vCont;s:2;c") is None
    assert session.handle(b"vCont;c") is None
    assert session.handle(b"vCont;S05:1") is None
    assert session.handle(b"c") is None
    assert session.handle(b"Hc2") == b"OK" and session.handle(b"s") is None
    assert session.handle(b"vCont;t") == b"OK"
    assert target.resumed == [{2: "s", 1: "c"}, {1: "c", 2: "c"}, {1: "s"}, {1: "c", 2: "c"}, {2: "s"}]
    assert session.handle(b"c2000") is None and target.regs[1]["rip"] == 0x2000  # c ADDR: resume there
    assert session.handle(b"vCont;s:7") == b"E16"


def test_stop_replies(session):
    assert session.handle(b"?") == b"T05thread:1;"
    assert session.target.stops == 1
    assert session.stop_reply(StopEvent(2, "interrupt")) == b"T02thread:2;"
    assert session.stop_reply(StopEvent(1, "watch", 0x1010)) == b"T05thread:1;watch:1010;"
    assert session.stop_reply(StopEvent(1, "swbreak")) == b"T05thread:1;"  # gdb did not offer swbreak+
    session.handle(b"qSupported:swbreak+;hwbreak+")
    assert session.stop_reply(StopEvent(1, "swbreak")) == b"T05thread:1;swbreak:;"
    assert session.stop_reply(StopEvent(2, "hwbreak")) == b"T05thread:2;hwbreak:;"
    assert session.stop_reply(StopEvent(1, "exited", exit_status=33)) == b"W21"


def test_unknown_and_empty_packets_get_the_empty_reply(session):
    for payload in (b"", b"vMustReplyEmpty", b"qTStatus", b"!", b"\xff\xfe"):
        assert session.handle(payload) == b""


def test_detach_and_kill_are_noted_for_the_server(session):
    assert session.handle(b"D") == b"OK" and session.detached
    assert session.handle(b"k") is None and session.killed


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "address"), [
    ("tcp:127.0.0.1:1234", GdbAddress("127.0.0.1", 1234)),
    ("tcp::4321", GdbAddress("127.0.0.1", 4321)),
    ("tcp:0.0.0.0:1", GdbAddress("0.0.0.0", 1)),
    ("tcp:[::1]:1234", GdbAddress("::1", 1234)),
    ("1234", GdbAddress("127.0.0.1", 1234)),
    ("unix:/tmp/gdb.sock", GdbAddress(path="/tmp/gdb.sock")),
])
def test_gdb_addresses_as_qemu_spells_them(text, address):
    assert parse_gdb_address(text) == address


@pytest.mark.parametrize("text", ["tcp:", "tcp:host:", "tcp:host:port", "tcp::65536", "unix:", "udp:1:2", "tcp:::1:2"])
def test_bad_gdb_addresses_are_one_clear_error(text):
    with pytest.raises(PyvmmError, match="--gdb"):
        parse_gdb_address(text)


def test_s_is_loopback_1234_and_s_capital_needs_a_debugger():
    assert gdb_spec(None, True, False).address == GdbAddress("127.0.0.1", 1234)
    assert gdb_spec("tcp::9", False, True).paused
    assert gdb_spec(None, False, False) is None
    with pytest.raises(PyvmmError, match="-S"):
        gdb_spec(None, False, True)
    with pytest.raises(PyvmmError, match="exclude"):
        gdb_spec("tcp::9", True, False)
