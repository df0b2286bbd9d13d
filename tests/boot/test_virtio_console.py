"""virtio-console (hvc0) under the real Debian kernel: a long stream of output, then input;
and `--console virtio` at a terminal with a guest that has no virtio-console driver.

Linux's hvc write polls for each transmit buffer and takes it back itself,
with interrupts disabled (devices/virtio/console.py says more); a device
that interrupted for every such buffer had all of them reported as
IRQ_NONE, and after 100,000 the kernel disabled the device's interrupt
("irq NN: nobody cared"), which took console input with it.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.boot.session import PROMPT, GuestSession, converse_on_a_terminal
from tests.boot.virtio_guest import overlay_initrd, pyvmm_command

pytestmark = pytest.mark.slow

# n_tty writes a line as two buffers (the text, then "\r\n" for the "\n"), so
# 100,000 lines raised 200,000 interrupts: two of the kernel's windows of 100,000
# (a window with a 100 ms pause in it is forgiven, which a loaded host can cause:
# the interrupt count is what fails for certain), about 25 s on the software CPU.
LINES = 100_000
TYPED = "typed-after-the-output"

# Kernel messages stay off the console (dmesg -n 1): on the serial port they could land
# inside a line printed on hvc0, as both reach the same terminal.
OUTPUT_THEN_INPUT = f"""
dmesg -n 1
interrupts() {{ awk '/virtio0/ {{ print $2 }}' /proc/interrupts; }}
exec 3<>/dev/hvc0
before=$(interrupts)
seq 1 {LINES} >&3
echo "interrupts-during-output=$(($(interrupts) - before))"
echo "nobody-cared=$(dmesg | grep -c 'nobody cared')"
echo ready-for-input
read -t 60 line <&3
echo "hvc0-read=$line"
"""
# The kernel disables an interrupt when more than 99,900 of 100,000 went unhandled.
TOLERATED_INTERRUPTS = 100


def test_hvc0_takes_input_after_a_long_stream_of_output(linux_assets, tmp_path):
    initrd = overlay_initrd(linux_assets, OUTPUT_THEN_INPUT, tmp_path / "initrd.img")
    session = GuestSession(program=pyvmm_command(linux_assets, initrd, "--console", "virtio", "--accel", "tcg"),
                           timeout=600)
    try:
        session.expect("ready-for-input")
        session.send(TYPED)
        session.expect(f"hvc0-read={TYPED}", timeout=120)
        status, stderr = session.wait()
    finally:
        session.close()
    output = session.output.decode(errors="replace")
    assert status == 0, stderr
    during_output = int(re.search(r"interrupts-during-output=(\d+)", output)[1])
    # The guest took back every buffer itself: none of them called for an interrupt.
    assert during_output < TOLERATED_INTERRUPTS, f"{during_output} interrupts while the guest printed"
    assert "nobody-cared=0" in output, output[-3000:]
    # Every line arrived, in order.
    numbers = [line for line in output.replace("\r\n", "\n").splitlines() if line.isdigit()]
    assert numbers == [str(n) for n in range(1, LINES + 1)]


FLOOD_ON_HVC0 = """
echo hvc0-flooding >/dev/hvc0
while :; do echo x; done >/dev/hvc0
"""


def test_a_guest_printing_forever_on_hvc0_is_stopped_when_the_reader_exits(linux_assets, linux_accel, tmp_path):
    # `pyvmm boot --console virtio ... | head`: virtio-console's output (written by a vCPU on the
    # software CPU, by the I/O thread on KVM) meets the closed pipe.
    initrd = overlay_initrd(linux_assets, FLOOD_ON_HVC0, tmp_path / "initrd.img")
    session = GuestSession(program=pyvmm_command(linux_assets, initrd, "--console", "virtio", "--accel", linux_accel),
                           timeout=600)
    try:
        session.expect("hvc0-flooding\r\nx\r\n")
        session.process.stdout.close()  # the reader exits
        status, stderr = session.wait()
    finally:
        session.close()
    assert status == 141, stderr
    assert stderr.splitlines()[-1] == "pyvmm: stdout was closed (Broken pipe); stopped the guest"


def test_at_a_terminal_a_guest_without_virtio_console_is_typed_to_on_the_serial_port(linux_assets):
    # The test initramfs loads no virtio module: the guest never sets up hvc0, and its
    # shell is on ttyS0 (the kernel's console=ttyS0 is the one that registers).
    answer = b"\r\ntyped-42\r\n"  # the command's output, not its echo
    status, output = converse_on_a_terminal(
        [sys.executable, "-m", "vmm", "boot", "--kernel", str(linux_assets.kernel), "--initrd",
         str(linux_assets.initrd), "--console", "virtio", "--accel", "tcg", "--memory", "256M"],
        [(PROMPT, b"echo typed-$((6*7))\r"), (answer, b"poweroff -f\r")])
    assert answer in output, output[-3000:]
    assert status == 0, output[-3000:]
    # One notice says where the input went, once.
    assert output.count(b"pyvmm: the guest has not set up virtio-console (hvc0) yet") == 1, output[-3000:]
