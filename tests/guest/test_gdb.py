"""The gdb stub, driven by the real gdb on each accelerator.

The test kernel (tests/guest/kernel/, built with -g) has a small program for
the debugger under `testkernel=gdb`; gdb reads its symbols from
testkernel.elf. On a host whose KVM refuses something (kvm_pvm: no int3 in
ring 0, no data watchpoints) the stub says so in one line, and the test does
what that line tells a user to do.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess

import pytest

from tests.guest.gdb_driver import DebuggedVm
from tests.guest.test_cli_errors import assert_one_line_error
from tests.helpers import run_pyvmm
from vmm.gdb.packets import Ack, Packet, PacketReader, frame
from vmm.gdb.registers import G_PACKET_SIZE
from vmm.kvm import quirks

EXIT_STATUS = 33  # the gdb program's debug-exit status


@pytest.fixture
def debugged(test_kernel, accel):
    """debugged(*cmdline_words, cpus=1) -> a DebuggedVm running the test kernel's gdb program."""
    started = []

    def start(*words: str, cpus: int = 1, listen: str = "tcp:127.0.0.1:0") -> DebuggedVm:
        vm = DebuggedVm("--kernel", str(test_kernel), "--accel", accel, "--cpus", str(cpus), "--memory", "128M",
                        "--cmdline", " ".join(("console=ttyS0 testkernel=gdb", *words)), listen=listen)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.close()


@pytest.fixture
def elf(test_kernel):
    return test_kernel.parent / "testkernel.elf"


def test_break_by_name_registers_locals_step_and_exit_status(debugged, elf):
    vm = debugged()
    out = vm.gdb_batch([
        "break gdb_compute", "continue",
        "printf \"seed=%d\\n\", $rdi", "info registers rip",
        "stepi", "printf \"rip1=%x\\n\", $rip", "stepi", "printf \"rip2=%x\\n\", $rip",
        "stepi", "printf \"rip3=%x\\n\", $rip",
        "break gdb_checkpoint", "continue", "up", "print local", "x/gx &local",
        "delete", "continue",
    ], elf)
    assert "Breakpoint 1, gdb_compute (seed=seed@entry=5)" in out, out
    assert "seed=5" in out
    entry = re.search(r"rip\s+0x([0-9a-f]+)\s+0x[0-9a-f]+ <gdb_compute>", out)
    assert entry, out
    rips = [int(re.search(rf"rip{i}=([0-9a-f]+)", out).group(1), 16) for i in (1, 2, 3)]
    assert int(entry.group(1), 16) < rips[0] < rips[1] < rips[2], (entry.group(1), rips)
    assert "Breakpoint 2, gdb_checkpoint ()" in out
    assert "$1 = 15" in out  # the local variable, through its DWARF location
    assert re.search(r"0x[0-9a-f]+:\s+0x000000000000000f", out), out
    assert f"exited with code 0{EXIT_STATUS:o}]" in out  # gdb prints it in octal
    assert vm.wait() == EXIT_STATUS
    assert "gdb: value 22" in vm.guest_output()


def test_watchpoint_shows_old_and_new_values(debugged, elf):
    vm = debugged()
    # Where the host's KVM cannot watch data, gdb watches by single-stepping.
    software = ["set can-use-hw-watchpoints 0"] if b"can-use-hw-watchpoints" in vm.stderr else []
    out = vm.gdb_batch([*software, "break gdb_bump", "continue", "delete", "watch gdb_watched",
                        "continue", "printf \"stopped at %#lx\\n\", $pc", "disassemble gdb_bump",
                        "continue", "delete", "continue"], elf)
    assert re.search(r"Old value = 0\s+New value = 1", out), out
    assert re.search(r"Old value = 1\s+New value = 2", out), out
    # The stop is just past the instruction that stored to the variable, as on hardware.
    listing = re.findall(r"^\s*(?:=> )?0x([0-9a-f]+) <\+\d+>:\s*(.*)$", out, re.M)
    store = next(i for i, (_, text) in enumerate(listing) if re.search(r",\s*-?0x[0-9a-f]+\(%rip\)\s+# .*<gdb_watched>", text))
    assert re.search(r"stopped at 0x([0-9a-f]+)", out).group(1) == listing[store + 1][0].lstrip("0"), out
    assert vm.wait() == EXIT_STATUS
    assert "gdb: watched 2" in vm.guest_output()


def test_gdb_connects_to_a_unix_socket_by_its_path(debugged, elf, tmp_path):
    vm = debugged(listen=f"unix:{tmp_path / 'gdb.sock'}")
    assert vm.target == str(tmp_path / "gdb.sock")
    out = vm.gdb_batch(["break gdb_report", "continue", "delete", "continue"], elf)  # target remote PATH
    assert "Breakpoint 1, gdb_report (value=22)" in out, out
    assert f"exited with code 0{EXIT_STATUS:o}]" in out, out
    assert vm.wait() == EXIT_STATUS


def test_what_the_hosts_kvm_cannot_do_is_one_line_at_start(debugged, accel):
    vm = debugged()
    lines = [line for line in vm.stderr.decode().splitlines()
             if line.startswith("pyvmm: gdb: ") and "waiting for a debugger" not in line]
    if accel == "kvm" and quirks.is_kvm_pvm():
        assert len(lines) == 1, lines
        assert "int3" in lines[0] and "set can-use-hw-watchpoints 0" in lines[0], lines
    else:  # the software CPU, or a KVM that refuses nothing
        assert lines == [], lines


def test_changing_a_register_changes_what_the_guest_prints(debugged, elf):
    vm = debugged()
    out = vm.gdb_batch(["break gdb_report", "continue", "set $rdi = 99", "delete", "continue"], elf)
    assert "Breakpoint 1, gdb_report (value=22)" in out, out
    assert vm.wait() == EXIT_STATUS
    output = vm.guest_output()
    assert "gdb: value 99" in output and "gdb: value 22" not in output


def test_two_vcpus_are_two_threads_and_a_breakpoint_stops_both(debugged, elf):
    vm = debugged("gdb.spin", cpus=2)
    out = vm.gdb_batch([
        "break gdb_ap_busy", "continue", "info threads",
        # The boot CPU counts gdb_spins in a loop while it runs: two reads with a
        # gdb round trip between them agree only if it is stopped too.
        "printf \"spins=%d\\n\", gdb_spins", "info registers rip", "printf \"spins=%d\\n\", gdb_spins",
        "set var gdb_release = 1", "delete", "continue",
    ], elf)
    assert "Thread 2 hit Breakpoint 1, gdb_ap_busy ()" in out, out
    assert re.search(r"^\s+1\s+Thread 1 \(vCPU 0\)", out, re.M), out
    assert re.search(r"^\*\s+2\s+Thread 2 \(vCPU 1\) gdb_ap_busy", out, re.M), out
    spins = re.findall(r"spins=(\d+)", out)
    assert len(spins) == 2 and spins[0] == spins[1] and int(spins[0]) > 0, spins
    assert vm.wait() == EXIT_STATUS
    output = vm.guest_output()
    assert "gdb: released" in output and "gdb: ap working" in output


def test_interrupt_stops_a_spinning_guest_and_continue_resumes_it(debugged, elf):
    vm = debugged("gdb.spin")
    gdb = vm.start_gdb(["continue", "printf \"spins=%d\\n\", gdb_spins", "set var gdb_release = 1", "continue"],
                       elf)
    try:
        vm.session.expect("gdb: spinning")
        gdb.send_signal(signal.SIGINT)  # what Ctrl-C at gdb's prompt does: gdb sends the interrupt byte
        out = gdb.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if gdb.poll() is None:
            gdb.kill()
            gdb.wait()
    assert "received signal SIGINT" in out, out
    assert int(re.search(r"spins=(\d+)", out).group(1)) > 0, out
    assert vm.wait() == EXIT_STATUS
    assert "gdb: released" in vm.guest_output()


# -- the protocol on the socket, without gdb ---------------------------------------------------


class RawClient:
    """A client that speaks the protocol by hand: acks are collected, replies returned."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = PacketReader(1 << 20)
        self.acks: list[bool] = []
        self.packets: list[Packet] = []

    def send(self, raw: bytes) -> None:
        self.socket.sendall(raw)

    def reply(self) -> Packet:
        while not self.packets:
            data = self.socket.recv(65536)
            assert data, "the stub closed the connection"
            for event in self.reader.feed(data):
                if isinstance(event, Packet):
                    self.packets.append(event)
                elif isinstance(event, Ack):
                    self.acks.append(event.positive)
        packet = self.packets.pop(0)
        assert packet.valid
        return packet

    def ask(self, payload: bytes) -> bytes:
        self.send(frame(payload))
        return self.reply().payload


def test_malformed_packets_get_error_replies_and_the_stub_keeps_serving(debugged):
    vm = debugged()
    client = RawClient(vm.port)
    client.send(b"$?#00")  # a wrong checksum: negative acknowledgement, no reply
    client.send(b"\x00garbage")  # noise between packets
    assert client.ask(b"?").startswith(b"T05thread:1;")
    assert client.acks == [False, True]  # '-' for the bad checksum, '+' for the good packet
    assert client.ask(b"Zq,1,1") == b"E16"
    assert client.ask(b"Z0,zz,1") == b"E16"
    assert client.ask(b"mfffffffffffffffff,1") == b"E16"  # beyond 64 bits
    assert client.ask(b"m0,") == b"E16"
    assert client.ask(b"G00") == b"E16"
    assert client.ask(b"P1234=00") == b"E16"
    assert client.ask(b"Hgzz") == b"E16"
    assert client.ask(b"vCont;x") == b"E16"
    assert client.ask(b"X100000,4:ab") == b"E16"  # fewer bytes than announced
    assert client.ask(b"vFrobnicate") == b""  # unknown: "not supported"
    assert client.ask(b"m" + b"1" * 40000 + b",1") == b"E16"  # longer than PacketSize
    assert client.ask(b"m8000000000000000,10") == b"E0e"  # not canonical: an error, not a crash
    assert client.ask(b"m7fffffff0000,10") == b"E0e"  # not mapped
    assert client.ask(b"Mfec00000,4:00000000") == b"E0e"  # the I/O APIC: a device, not RAM
    registers = client.ask(b"g")
    assert len(registers) == 2 * G_PACKET_SIZE
    assert client.ask(b"qSupported:swbreak+").startswith(b"PacketSize=")

    # A second debugger is turned away with a message; the first one is still served.
    second = RawClient(vm.port)
    assert second.ask(b"qSupported") == b"E.a debugger is already attached to this VM"
    assert client.ask(b"qAttached") == b"1"

    # Going away without detaching leaves the guest running to its end.
    client.socket.close()
    assert vm.wait() == EXIT_STATUS
    assert "gdb: done" in vm.guest_output()
    assert b"refused a second debugger" in vm.stderr + vm.session.process.stderr.read()


def symbol(elf, name: str) -> int:
    table = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    return next(int(line.split()[0], 16) for line in table.splitlines() if line.endswith(f" {name}"))


def test_a_debugger_that_vanishes_while_the_guest_runs_leaves_it_running_without_breakpoints(debugged, elf):
    vm = debugged()
    client = RawClient(vm.port)
    bump = symbol(elf, "gdb_bump")
    assert client.ask(b"qSupported:hwbreak+").startswith(b"PacketSize=")
    assert client.ask(b"Z1,%x,1" % bump) == b"OK"
    client.send(frame(b"vCont;c"))
    assert client.reply().payload == b"T05thread:1;hwbreak:;"  # the first of the two calls
    client.send(frame(b"vCont;c"))
    client.socket.close()  # gone without z1 or D: the second call must not stop the guest
    assert vm.wait() == EXIT_STATUS
    assert "gdb: watched 2" in vm.guest_output()


@pytest.mark.parametrize(("args", "message"), [
    (["--gdb", "tcp:localhost:http"], b"expected tcp:[HOST]:PORT or unix:PATH"),
    (["-S"], b"-S/--paused waits for a debugger"),
    (["-s", "--gdb", "tcp::1"], b"exclude each other"),
    (["--gdb", "tcp:192.0.2.1:1234"], b"cannot listen"),  # an address this host does not have
])
def test_bad_gdb_options_are_one_line_errors(guest, args, message):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "tcg", *args)
    assert_one_line_error(result, message)


def test_a_port_in_use_is_one_line_error(guest):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "tcg", "--gdb", f"tcp::{port}")
    assert_one_line_error(result, f"--gdb tcp:127.0.0.1:{port}: cannot listen".encode())


def test_an_existing_unix_socket_path_is_refused_not_replaced(guest, tmp_path):
    path = tmp_path / "gdb.sock"
    path.write_text("precious")
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "tcg", "--gdb", f"unix:{path}")
    assert_one_line_error(result, b"exists already")
    assert path.read_text() == "precious"


def test_without_a_debugger_attaching_the_guest_just_runs(guest, tmp_path):
    path = tmp_path / "gdb.sock"
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "tcg", "--gdb", f"unix:{path}")
    assert result.returncode == 42, result.stderr
    assert not path.exists()  # removed when pyvmm ended


def test_detach_lets_the_guest_run_and_kill_ends_the_vm(debugged):
    detached = debugged()
    client = RawClient(detached.port)
    assert client.ask(b"D") == b"OK"
    assert detached.wait() == EXIT_STATUS
    killed = debugged()
    client = RawClient(killed.port)
    client.send(frame(b"k"))
    assert killed.wait() == 130
    assert b"killed by the debugger" in killed.session.process.stderr.read()
