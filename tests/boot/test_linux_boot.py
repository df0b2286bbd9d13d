"""The Debian cloud kernel with the busybox initramfs, booted through the CLI.

`--accel auto`: KVM where KVM can run Linux, the software CPU elsewhere (on
the kvm_pvm development and CI hosts). Each test is one boot and checks as
much as it can per boot: every boot costs tens of seconds on the software CPU.
"""

from __future__ import annotations

import re

import pytest

from tests.assets import MARKER
from tests.boot.session import PROMPT, GuestSession


@pytest.fixture
def boot_linux(linux_assets):
    sessions = []

    def boot(*args: str, env: dict[str, str] | None = None) -> GuestSession:
        session = GuestSession("--kernel", str(linux_assets.kernel), "--initrd", str(linux_assets.initrd),
                               *args, env=env)
        sessions.append(session)
        return session

    yield boot
    for session in sessions:
        session.close()


@pytest.mark.parametrize("cpus", [1, 2])
def test_boots_to_a_shell_and_powers_off(boot_linux, cpus, tmp_path):
    # With one vCPU, the host pretends to have no /dev/kvm: the same command
    # must boot on the software CPU and say why.
    hidden_kvm = {"PYVMM_KVM_DEVICE": str(tmp_path / "no-kvm")} if cpus == 1 else None
    guest = boot_linux("--cpus", str(cpus), "--memory", "256M", "--stats", env=hidden_kvm)
    guest.expect(MARKER)
    guest.expect(PROMPT)
    assert guest.run("nproc").strip() == str(cpus)
    assert guest.run("grep -c ^processor /proc/cpuinfo").strip() == str(cpus)
    mem_total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", guest.run("cat /proc/meminfo")).group(1))
    assert 200 * 1024 < mem_total_kib <= 256 * 1024
    assert "self" in guest.run("ls /proc").split()
    assert guest.run("for i in 1 2 3; do echo loop$i; done").split() == ["loop1", "loop2", "loop3"]
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr
    assert re.search(r"boot timer: userspace reached [0-9.]+ s after pyvmm started", stderr)
    if hidden_kvm:
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
