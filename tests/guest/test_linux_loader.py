"""The Linux boot path, checked by a tiny test kernel (tests/guest/kernel/).

The test kernel is booted through `pyvmm boot --kernel` like Linux and
prints what it finds: what the loader wrote into boot_params, the ACPI
tables, the CPUs it could start with INIT/SIPI, whether the UART's interrupt
arrived through the I/O APIC, and finally it powers off through the FADT.
Every mechanism Linux relies on, in seconds, on every accelerator.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import run_pyvmm


@pytest.fixture(scope="session")
def initrd(tmp_path_factory):
    path = tmp_path_factory.mktemp("initrd") / "initrd.img"
    path.write_bytes(b"pyvmm initrd payload 0123456789" + bytes(range(256)) * 64)
    return path


def boot(kernel, accel, *args):
    result = run_pyvmm("boot", "--kernel", str(kernel), "--accel", accel, *args, timeout=120)
    return result, result.stdout.decode(errors="replace")


@pytest.mark.parametrize("cpus", [1, 4, 32])
def test_loader_hands_over_what_linux_needs(test_kernel, initrd, accel, cpus):
    result, out = boot(test_kernel, accel, "--initrd", str(initrd), "--cpus", str(cpus),
                       "--memory", "256M", "--cmdline", "console=ttyS0 pyvmm.test=1")
    assert result.returncode == 0, out + result.stderr.decode()
    assert "header HdrS" in out
    # The user's command line, then the accelerator's additions (what the host's KVM needs;
    # the software CPU's mitigations=off), then pyvmm's reboot parameters.
    accel_additions = " mitigations=off" if accel == "tcg" else "( noxsave)?"
    assert re.search(rf"^cmdline: console=ttyS0 pyvmm\.test=1{accel_additions} panic=-1 reboot=panic_warm$", out, re.M)
    assert b"looks stuck" not in result.stderr  # APs waiting for their SIPI are not stuck
    # The e820 map: low RAM, the reserved EBDA/BIOS area, RAM from 1 MiB to the end.
    assert "e820: 0000000000000000-000000000009fbff type 1" in out
    assert "e820: 000000000009fc00-00000000000fffff type 2" in out
    assert "e820: 0000000000100000-000000000fffffff type 1" in out
    assert "e820: 255 MiB of RAM" in out
    assert f"initrd: {initrd.stat().st_size} bytes" in out
    assert "(page aligned: yes): pyvmm initrd payload 012345678" in out
    # ACPI, reached both ways, every checksum right.
    assert re.search(r"^rsdp: boot_params ([0-9a-f]+), legacy scan \1$", out, re.M)
    assert "BAD" not in out
    for table in ("FACP", "DSDT", "APIC"):
        assert f"acpi: {table} checksum ok" in out
    assert "fadt: revision 6, hardware-reduced yes" in out
    assert f"madt: {cpus} local apics, ioapic at fec00000" in out
    assert "madt: interrupt override irq 0 -> gsi 2" in out
    # SMP through INIT/SIPI, the UART interrupt through the I/O APIC, ACPI power-off.
    assert f"smp: {cpus} cpus online" in out
    for apic_id in range(1, cpus):
        assert f"smp: cpu with apic id {apic_id} is up" in out
    assert "uart irq: taken through the ioapic" in out
    assert out.endswith("poweroff: writing S5\n")


def test_memory_above_the_mmio_hole_is_reported_as_ram(test_kernel, accel):
    result, out = boot(test_kernel, accel, "--memory", "3200M")
    assert result.returncode == 0, out
    assert "e820: 0000000000100000-00000000bfffffff type 1" in out   # up to the hole at 3 GiB
    assert "e820: 0000000100000000-0000000107ffffff type 1" in out   # the other 128 MiB above 4 GiB
    assert "e820: 3199 MiB of RAM" in out                             # all but the reserved 1 KiB EBDA...


def test_command_line_too_long_for_the_kernel(test_kernel):
    result, _ = boot(test_kernel, "tcg", "--cmdline", "x" * 3000)
    assert result.returncode == 1
    # 3000 bytes, the software CPU's " mitigations=off" and pyvmm's reboot parameters
    # (boot/reboot_params.py).
    assert b"command line is 3043 bytes; this kernel accepts at most 2047" in result.stderr
    assert b"Traceback" not in result.stderr


def test_initrd_that_does_not_fit(test_kernel, tmp_path):
    big = tmp_path / "big.img"
    big.write_bytes(bytes(40 << 20))
    result, _ = boot(test_kernel, "auto", "--initrd", str(big), "--memory", "32M")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert b"does not fit" in result.stderr


@pytest.mark.parametrize("content", [b"", b"MZ not a kernel at all" * 100, bytes(600)],
                         ids=["empty", "dos-executable", "zeros"])
def test_files_that_are_not_kernels(tmp_path, content):
    path = tmp_path / "kernel"
    path.write_bytes(content)
    result = run_pyvmm("boot", "--kernel", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(b"pyvmm: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_too_many_cpus(test_kernel):
    result, _ = boot(test_kernel, "auto", "--cpus", "65")
    assert result.returncode == 1
    assert b"--cpus 65 is more than pyvmm supports (64)" in result.stderr
