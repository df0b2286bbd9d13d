"""A guest printing on the serial port of a software-CPU VM, through the compiled port path and
through Python alone (PYVMM_UART_PORTS=python): the same output, registers and counts."""

from __future__ import annotations

import pytest

from devices import uart_ports
from devices.uart import COM1_PORT, Uart16550
from tests.unit.tcg_support import TcgMachine, assemble
from vmm.bus import NullIrqLine

# Polls LSR for THRE before each byte, as firmware and early printk do; leaves a value in the
# scratch register and reads it back as its exit status.
PRINT = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $0x3f9, %dx
    mov $0x05, %al          /* IER: received data and line status */
    out %al, %dx
    mov $message, %si
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
    jmp next
done:
    mov $0x3ff, %dx
    mov $0x5a, %al
    out %al, %dx
    in %dx, %al
    out %al, $0xf4
message: .asciz "hello from the serial port\\r\\n"
"""


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_guest_prints_on_the_serial_port(path, monkeypatch, tmp_path):
    if path == "compiled" and not uart_ports.compiled_ports_built():
        pytest.skip("the serial port's compiled port path is not built (python -m devices.uart_ports_build)")
    if path == "python":
        monkeypatch.setenv(uart_ports.PORTS_ENV, "python")
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
