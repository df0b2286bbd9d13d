"""The Debian cloud kernel with the busybox initramfs, booted through the CLI.

Each test runs on every accelerator that can run Linux here (`linux_accel`,
tests/boot/conftest.py). Each test is one boot and checks as much as it can
per boot: every boot costs tens of seconds on the software CPU, and each
exit that reaches Python costs milliseconds on a nested KVM.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.assets import MARKER
from tests.boot.session import PROMPT, GuestSession
from vmm.config import DEFAULT_CMDLINE

# Inside the nested tier's L1 (tests/nested) these tests ask less of the platform: QEMU's
# emulated SVM now and then triple-faults a 2-vCPU L2 printing through interrupts, QEMU's
# own L2 as well as pyvmm's (docs/testing.md, "Linux on a real KVM"). There the boot log stays in
# dmesg (`quiet`: each console byte is two exits, and the log was three quarters of a
# boot test's), and the guest prints 300 lines in one go instead of 3,000.
IN_L1 = bool(os.environ.get("PYVMM_IN_L1"))
BURST_LINES = 300 if IN_L1 else 3000
# Each CPU runs a busy loop pinned to it and reports where it ran (field 39 of
# /proc/PID/stat is the CPU the task last ran on).
WORK_ON_CPU = "w() { taskset -c $1 sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; cut -d\" \" -f39 /proc/self/stat'; }"


@pytest.fixture
def boot_linux(linux_assets, linux_accel):
    sessions = []

    def boot(*args: str, accel: str = linux_accel, env: dict[str, str] | None = None) -> GuestSession:
        if IN_L1:
            args = ("--cmdline", f"{DEFAULT_CMDLINE} quiet", *args)
        session = GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                               "--accel", accel, *args, env=env)
        sessions.append(session)
        return session

    yield boot
    for session in sessions:
        session.close()


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_boots_to_a_shell_and_powers_off(boot_linux, linux_accel, cpus, tmp_path):
    # On the software CPU with one vCPU, the host pretends to have no /dev/kvm:
    # `--accel auto` must then boot on the software CPU and say why.
    fallback = linux_accel == "tcg" and cpus == 1
    if fallback:
        guest = boot_linux("--cpus", "1", "--memory", "256M", "--stats", accel="auto",
                           env={"PYVMM_KVM_DEVICE": str(tmp_path / "no-kvm")})
    else:
        guest = boot_linux("--cpus", str(cpus), "--memory", "256M", "--stats")
    guest.expect(MARKER)
    guest.expect(PROMPT)
    guest.run("stty cols 500")  # no line wrapping (and its cursor moves) in long commands below
    # Each command goes in on stdin and its answer comes back on the console.
    assert guest.run("nproc").strip() == str(cpus)
    assert guest.run("grep -c ^processor /proc/cpuinfo").strip() == str(cpus)
    mem_total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", guest.run("cat /proc/meminfo")).group(1))
    assert 200 * 1024 < mem_total_kib <= 256 * 1024
    assert "self" in guest.run("ls /proc").split()
    assert guest.run("for i in 1 2 3; do echo loop$i; done").split() == ["loop1", "loop2", "loop3"]
    guest.run(WORK_ON_CPU)
    # In a subshell: no job-control notices from the interactive shell. Each answer
    # is a line that starts with its CPU number. The kernel prints its messages on
    # the same console, whole, between the shell's writes: on a line of their own,
    # or after a number whose newline had not been written yet ("2[  31.5] ...").
    answer = guest.run(f"(for c in $(seq 0 {cpus - 1}); do w $c & done; wait)")
    ran_on = [m.group(1) for line in answer.splitlines() if (m := re.match(r"(\d+)(\[|$)", line.strip()))]
    assert sorted(ran_on) == [str(cpu) for cpu in range(cpus)], ran_on
    clocksource = guest.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource").strip()
    if linux_accel == "kvm":
        assert clocksource == "kvm-clock"  # KVM offers it (CPUID 0x40000001), Linux prefers it
    if linux_accel == "tcg":
        # pyvmm turns off the mitigations for flaws the software CPU cannot have
        # (vmm/tcg/accel.py); page-table isolation would be the costliest.
        assert "PTI" not in guest.run("cat /sys/devices/system/cpu/vulnerabilities/meltdown")
    # Output in bursts through the 8250 driver's interrupt-driven transmit path (a THRE
    # interrupt per burst, devices/uart.py): every line arrives, in order.
    answer = guest.run(f"seq 1 {BURST_LINES}")
    numbers = [m.group(1) for line in answer.splitlines() if (m := re.match(r"(\d+)(\[|$)", line.strip()))]
    assert numbers == [str(n) for n in range(1, BURST_LINES + 1)]
    assert guest.run("dmesg | grep WARNING:").strip() == ""
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr
    assert re.search(r"boot timer: userspace reached [0-9.]+ s after pyvmm started", stderr)
    assert f"accelerator {linux_accel}" in stderr
    if fallback:
        assert stderr.startswith(f"pyvmm: using the software CPU: {tmp_path / 'no-kvm'} does not exist")


@pytest.mark.parametrize(("command", "status", "message"), [
    ("echo c > /proc/sysrq-trigger", 4, "pyvmm: the guest kernel panicked"),  # through pvpanic
    ("reboot -f", 7, "pyvmm: the guest asked for a reset"),                   # the FADT reset register
], ids=["panic", "reboot"])
def test_the_guest_ending_itself_gives_its_exit_status(boot_linux, command, status, message):
    guest = boot_linux()
    guest.expect(PROMPT)
    guest.send(command)
    exit_status, stderr = guest.wait()
    assert exit_status == status, stderr
    assert message in stderr


def test_an_amd_guest_finds_its_clock_rates_on_the_software_cpu(linux_assets):
    # An AMD CPU model tells Linux no TSC rate (Intel's CPUID leaf 0x15 does,
    # vmm/tcg/cpuid.py): Linux measures it against the ACPI PM timer, then
    # each CPU's local APIC timer against the TSC (devices/acpi_pm.py).
    # Without a reference it waited forever for a timer tick.
    guest = GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                         "--accel", "tcg", "--cpu-vendor", "amd", "--cpus", "2", "--memory", "256M")
    try:
        guest.expect(PROMPT)
        assert "AuthenticAMD" in guest.run("grep -m1 vendor_id /proc/cpuinfo")
        dmesg = guest.run("dmesg")
        assert "tsc: Detected" in dmesg and "could not calculate TSC khz" not in dmesg, dmesg
        # The local timer has interrupted both CPUs: their APIC timers run at the calibrated rate.
        local_timer = guest.run("grep LOC: /proc/interrupts").split()[1:3]
        assert all(int(count) > 0 for count in local_timer), local_timer
        guest.send("poweroff")
        status, stderr = guest.wait()
    finally:
        guest.close()
    assert status == 0, stderr
