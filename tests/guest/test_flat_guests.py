"""Flat guests through `pyvmm boot --flat`, on every accelerator, asserting on
what they print on COM1 and on pyvmm's exit status. On KVM each runs through
both exit loops (vmm/kvm/exit_loop.py): the compiled one and the Python one."""

from __future__ import annotations

import os

import pytest

from tests.guest.conftest import ACCELERATORS, use_kvm_exit_loop
from tests.helpers import run_pyvmm
from vmm.kvm.exit_loop import LOOP_ENV


@pytest.fixture(params=[pytest.param("kvm", marks=pytest.mark.kvm),
                        pytest.param("kvm-python-loop", marks=pytest.mark.kvm), *ACCELERATORS[1:]])
def accel(request, monkeypatch) -> str:
    """What --accel gets; "kvm-python-loop" is --accel kvm with PYVMM_EXIT_LOOP=python."""
    if request.param == "tcg":
        return "tcg"
    use_kvm_exit_loop("python" if request.param == "kvm-python-loop" else "compiled", monkeypatch)
    return "kvm"


def boot(image, accel, *extra):
    return run_pyvmm("boot", "--flat", str(image), "--accel", accel, *extra, timeout=60)


def test_real_mode_out_prints_and_exits_with_written_status(guest, accel):
    result = boot(guest("hello"), accel)
    assert result.stdout == b"Hello from real mode\n"
    assert result.returncode == 0x2A
    assert result.stderr == b""


def test_rep_outsb_delivers_every_byte(guest, accel):
    result = boot(guest("rep_outsb"), accel)
    assert result.stdout == b"Hello from rep outsb\n"
    assert result.returncode == 0


def test_climbs_to_long_mode_and_mmio_of_every_size_reaches_device(guest, accel):
    result = boot(guest("long_mode"), accel, "--stats")
    assert result.stdout == b"protected mode\nlong mode\nmmio ok\n", result.stderr
    assert result.returncode == 0
    # 5 reads and 4 writes reached the scratch device, as the guest made them;
    # the software CPU splits each 8-byte access in two 4-byte ones (Unicorn's
    # MMIO callbacks take at most 4 bytes), which real chipsets may do too.
    accesses = 9 if accel == "kvm" else 11
    assert f"scratch      0xd0000000+0x1000: {accesses} accesses".encode() in result.stderr


def test_hlt_with_nothing_to_wake_the_guest_stops_the_vm(guest, accel):
    result = boot(guest("hlt"), accel)
    assert result.stdout == b"halting\n"
    assert result.returncode == 0


def test_unclaimed_ports_read_all_ones(guest, accel):
    result = boot(guest("unclaimed"), accel, "--stats")
    assert result.stdout == b"unclaimed ok\n"
    assert result.returncode == 0
    assert b"pio unclaimed: 0x2a0 (" in result.stderr


def test_triple_fault_is_reported_with_its_own_status(guest, accel):
    result = boot(guest("triple_fault"), accel)
    assert result.returncode == 3
    assert result.stderr.strip() == b"pyvmm: vCPU 0: the guest triple-faulted"


def test_int3_through_the_ivt(guest, accel):
    result = boot(guest("int3"), accel)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"int3 handled\n"


def test_stats_count_exits_and_port_accesses(guest, accel):
    result = boot(guest("hello"), accel, "--stats")
    if accel == "kvm":  # which exit loop ran, and both count the same exits
        loop = "Python" if os.environ.get(LOOP_ENV) == "python" else "compiled"
        assert f"accelerator kvm, {loop} exit loop".encode() in result.stderr
        assert b"IoOut 22" in result.stderr  # 21 characters and the exit status
    assert b"pio com1" in result.stderr
    assert b"21 accesses" in result.stderr  # 21 characters, one `out` each
