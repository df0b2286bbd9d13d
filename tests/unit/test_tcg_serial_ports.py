"""A guest printing on the serial port of a software-CPU VM, through the compiled port path and
through Python alone (PYVMM_UART_PORTS=python): the same output, registers and counts, and
the output in the guest's order with what it does next."""

from __future__ import annotations

import threading

import pytest

from boot.firmware import BootFailureWatch
from devices import uart_ports
from devices.legacy import register_legacy_ports
from devices.uart import COM1_PORT, Uart16550
from tests.unit.tcg_support import (
    LOAD_ADDRESS,
    TcgMachine,
    assemble,
    long_mode_state,
    run_in_thread,
)
from vmm.bus import NullIrqLine


def print_loop(after_each_byte: str = "") -> str:
    """Writes the string at %si to the serial port, polling LSR for THRE before each byte as
    firmware and early printk do, then runs `after_each_byte`; goes on at `done`."""
    return f"""
next:
    mov $0x3fd, %dx
wait:
    in %dx, %al
    test $0x20, %al
    jz wait
    lodsb
    test %al, %al
    jz done
    mov $0x3f8, %dx
    out %al, %dx
{after_each_byte}
    jmp next
"""


# Leaves a value in the scratch register and reads it back as its exit status.
PRINT = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $0x3f9, %dx
    mov $0x05, %al          /* IER: received data and line status */
    out %al, %dx
    mov $message, %si
""" + print_loop() + """
done:
    mov $0x3ff, %dx
    mov $0x5a, %al
    out %al, %dx
    in %dx, %al
    out %al, $0xf4
message: .asciz "hello from the serial port\\r\\n"
"""


def _use_path(path: str, monkeypatch) -> None:
    if path == "compiled" and not uart_ports.compiled_ports_built():
        pytest.skip("the serial port's compiled port path is not built (python -m devices.uart_ports_build)")
    if path == "python":
        monkeypatch.setenv(uart_ports.PORTS_ENV, "python")


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_guest_prints_on_the_serial_port(path, monkeypatch, tmp_path):
    _use_path(path, monkeypatch)
    output = bytearray()
    uart = Uart16550(NullIrqLine(), output.extend)
    machine = TcgMachine(ports=((COM1_PORT, 8, uart),))
    try:
        machine.load(assemble(PRINT, tmp_path))
        machine.run()
        assert (machine.vm.io_hooks.serial is not None) == (path == "compiled")
        assert machine.exit.status == 0x5A
        assert bytes(output) == b"hello from the serial port\r\n"
        assert uart.transmitted == len(output)
        accesses = machine.io.pio.find(COM1_PORT).accesses
        counts = machine.vcpus[0].io_counts
        # IER, one LSR read and one THR write a byte at least, SCR written and read back.
        assert accesses >= 1 + 2 * len(output) + 2
        assert counts["IoIn"] + counts["IoOut"] == accesses + 1  # and the exit port
    finally:
        machine.close()


class Recorder:
    """A device that logs each access to it in a log it shares with the UART's output: the
    byte written, or READ_MARK for a read."""

    def __init__(self, log: bytearray) -> None:
        self.log = log

    def read(self, offset: int, size: int) -> int:
        self.log.append(READ_MARK)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(value & 0xFF)


READ_MARK = 0xFF
FLAG = 0x600  # guest RAM a test's host side sets for its guest to see
RECORDER_PORT = 0x80
RECORDER_MMIO = 0xD000_0000
# What the guest does after each byte it printed: an access to another device, the way a
# Linux guest's serial line comes before its virtio-console output (an MMIO queue
# notification), or firmware's last words before its reset (a port write).
NEXT_ACCESSES = {
    "port write": f"out %al, ${RECORDER_PORT:#x}",
    "port read": f"in ${RECORDER_PORT:#x}, %al",
    "MMIO write": f"movabs %al, {RECORDER_MMIO:#x}",
    "MMIO read": f"movabs {RECORDER_MMIO:#x}, %al",
}


@pytest.mark.parametrize("access", NEXT_ACCESSES)
@pytest.mark.parametrize("path", ["compiled", "python"])
def test_serial_output_reaches_the_host_before_the_guests_next_access_to_another_device(path, access,
                                                                                          monkeypatch, tmp_path):
    _use_path(path, monkeypatch)
    log = bytearray()
    uart = Uart16550(NullIrqLine(), log.extend)
    machine = TcgMachine(ports=((COM1_PORT, 8, uart), (RECORDER_PORT, 1, Recorder(log))))
    machine.io.mmio.register(RECORDER_MMIO, 1, Recorder(log), "recorder")
    guest = """
    .code64
    lea message(%rip), %rsi
""" + print_loop(NEXT_ACCESSES[access]) + """
done:
    out %al, $0xf4
message: .asciz "in the order the guest wrote it\\r\\n"
"""
    try:
        machine.memory.write(LOAD_ADDRESS, assemble(guest, tmp_path, link_address=LOAD_ADDRESS))
        machine.vcpus[0].set_state(long_mode_state(machine.memory, LOAD_ADDRESS))
        machine.run()
        assert machine.exit.status is not None
        message = b"in the order the guest wrote it\r\n"
        recorded = (lambda byte: byte) if access.endswith("write") else (lambda byte: READ_MARK)
        assert bytes(log) == b"".join(bytes([byte, recorded(byte)]) for byte in message)
    finally:
        machine.close()


# Two bytes: the first through Python, which starts the UART's backstop thread, the second
# gathered in C; then the guest waits, without touching a device, until that thread has taken
# the second back and is sending it on (it says so in FLAG), and accesses another device.
WHILE_THE_BACKSTOP_SENDS = f"""
    .code16
    xor %ax, %ax
    mov %ax, %ds
    mov $0x3f8, %dx
    mov $'a', %al
    out %al, %dx
    mov $'b', %al
    out %al, %dx
wait:
    cmpb $0, {FLAG:#x}
    je wait
    mov $'c', %al
    out %al, ${RECORDER_PORT:#x}
    out %al, $0xf4
"""


def test_serial_output_another_thread_took_back_reaches_the_host_before_the_guests_next_access(
        monkeypatch, tmp_path):
    # The backstop thread (or host input) takes the gathered bytes back under the UART's lock
    # and sends them on: until it has, they are in neither the C buffer nor the output, and
    # the guest's next access must wait for them.
    _use_path("compiled", monkeypatch)
    log = bytearray()
    recorded = threading.Event()
    machine = None

    def output(data: bytes) -> None:
        if threading.current_thread().name == "uart-transmitter":
            machine.memory.write(FLAG, b"\x01")
            recorded.wait(timeout=0.5)  # long enough for an access that does not wait to come first
        log.extend(data)

    class Signalling(Recorder):
        def write(self, offset: int, size: int, value: int) -> None:
            super().write(offset, size, value)
            recorded.set()

    uart = Uart16550(NullIrqLine(), output)
    machine = TcgMachine(ports=((COM1_PORT, 8, uart), (RECORDER_PORT, 1, Signalling(log))))
    try:
        machine.load(assemble(WHILE_THE_BACKSTOP_SENDS, tmp_path))
        run_in_thread(machine)
        assert machine.exit.status is not None
        assert bytes(log) == b"abc"
    finally:
        machine.close()


# SeaBIOS with nothing to boot: its last words on the serial port, then a reset through
# port 0xcf9 (RST_CPU | SYS_RST), after which the machine tells the two apart.
LAST_WORDS = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $message, %si
""" + print_loop() + """
done:
    mov $0xcf9, %dx
    mov $0x06, %al
    out %al, %dx
    out %al, $0xf4
message: .asciz "No bootable device.\\r\\n"
"""


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_the_boot_failure_watch_has_seen_the_firmwares_last_words_when_it_resets(path, monkeypatch, tmp_path):
    # Machine.run reads the watch as soon as the reset stops the machine, on another thread:
    # the words must have reached it by the time the reset is handled.
    _use_path(path, monkeypatch)
    output = bytearray()
    watch = BootFailureWatch(output.extend)
    seen_at_reset = []
    uart = Uart16550(NullIrqLine(), watch)
    machine = TcgMachine(ports=((COM1_PORT, 8, uart),))
    register_legacy_ports(machine.io.pio, lambda: seen_at_reset.append(watch.seen))
    try:
        machine.load(assemble(LAST_WORDS, tmp_path))
        machine.run()
        assert machine.exit.status is not None
        assert seen_at_reset == [True]
        assert bytes(output) == b"No bootable device.\r\n"
    finally:
        machine.close()
