"""CPU mechanisms Linux relies on, checked by the test kernel (`testkernel=cpu`):
its own GDT, TSS and IDT; page faults with CR2 and error codes; the local
APIC timer and the PIT through the I/O APIC; ring 3 with SYSCALL/SYSRET and
`int $0x80`; `int $0x80` in ring 0. On every accelerator."""

from __future__ import annotations

import pytest

from tests.conftest import HOST_LIMITATION
from tests.helpers import run_pyvmm
from vmm.kvm import quirks


def run_tests(kernel, accel, *names: str) -> str:
    cmdline = " ".join(["testkernel=cpu", *(f"test.{name}" for name in names)])
    result = run_pyvmm("boot", "--kernel", str(kernel), "--accel", accel, "--cmdline", cmdline, timeout=120)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode()
    assert "cpu: gdt, tss and idt loaded" in out
    assert out.endswith("cpu: done\n"), out
    return out


def test_page_faults_report_cr2_and_error_codes(test_kernel, accel):
    out = run_tests(test_kernel, accel, "pf")
    # Not present, supervisor: a read has error code 0, a write 2; CR2 is the address.
    assert "pf: read returned ffffffffffffffff, cr2 140000000, error code 0" in out
    assert "pf: write returned ffffffffffffffff, cr2 140001000, error code 2" in out


def test_lapic_timer_and_pit_through_the_ioapic(test_kernel, accel):
    out = run_tests(test_kernel, accel, "timers")
    assert "timer: lapic one-shot fired once" in out
    assert "timer: pit through the ioapic ticking" in out


def test_ring3_syscall_sysret_and_software_interrupts(test_kernel, accel):
    if accel == "kvm" and quirks.is_kvm_pvm():
        pytest.skip(f"{HOST_LIMITATION} kvm_pvm cannot emulate SYSRET or `int n` in ring 0 "
                    "(PLATFORM.md); this runs on KVM wherever the host can run it")
    out = run_tests(test_kernel, accel, "ring3", "int80")
    user_main = out.split("(user_main ")[1].split(")")[0]
    assert "ring3: syscall 42 with argument 7, returning to " in out
    # SYSCALL saved the address after the 2-byte instruction at user_main + 10.
    assert f"returning to {int(user_main, 16) + 12:x}" in out
    assert "ring3: int 0x80 taken from cpl 3: 1 times" in out
    assert "ring3: back in the kernel" in out
    assert "int 0x80 from ring 0: taken 1 times" in out
