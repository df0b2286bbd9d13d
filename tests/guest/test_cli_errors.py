"""Bad input to `pyvmm boot` gets one clear line on stderr and a non-zero status."""

from __future__ import annotations

import pytest

from tests.helpers import run_pyvmm


def assert_one_line_error(result, *fragments: bytes) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(b"pyvmm: ") or lines[0].startswith(b"Error: "), lines[0]
    assert b"Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_image(tmp_path):
    result = run_pyvmm("boot", "--flat", str(tmp_path / "nope.bin"))
    assert_one_line_error(result, b"nope.bin: no such file")


@pytest.mark.parametrize("size, message", [
    ("0", b"--memory must be at least 1M (got 0 bytes)"),
    ("abc", b"invalid --memory 'abc': expected a number with an optional K, M, G or T suffix"),
    ("12Q", b"invalid --memory '12Q'"),
    ("-5M", b"invalid --memory '-5M'"),
])
def test_bad_memory_sizes(guest, size, message):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--memory", size)
    assert_one_line_error(result, message)


def test_memory_too_small_for_the_image(guest):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--memory", "64K")
    assert_one_line_error(result, b"at least 1M")


def test_zero_cpus(guest):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--cpus", "0")
    assert_one_line_error(result, b"--cpus must be at least 1")


def test_nothing_to_boot():
    result = run_pyvmm("boot")
    assert_one_line_error(result, b"nothing to boot")


def test_missing_kvm_device_with_accel_kvm(guest, tmp_path):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "kvm",
                       env={"PYVMM_KVM_DEVICE": str(tmp_path / "kvm")})
    assert_one_line_error(result, b"does not exist")


def test_kvm_device_that_is_not_kvm(guest, tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "kvm",
                       env={"PYVMM_KVM_DEVICE": str(fake)})
    assert_one_line_error(result, b"is not a KVM device")


def test_check_reports_missing_kvm(tmp_path):
    result = run_pyvmm("check", env={"PYVMM_KVM_DEVICE": str(tmp_path / "kvm")})
    assert b"kvm: unavailable" in result.stdout


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf"])
def test_bad_timeouts(guest, seconds):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--timeout", seconds)
    assert_one_line_error(result, f"--timeout must be a positive number of seconds (got {seconds})".encode())


def test_cpu_vendor_is_refused_on_kvm(guest):
    result = run_pyvmm("boot", "--flat", str(guest("hello")), "--accel", "kvm", "--cpu-vendor", "amd")
    assert_one_line_error(result, b"--cpu-vendor chooses the software CPU's vendor; a KVM guest sees the host's CPU")


def test_missing_disk_image(tmp_path):
    result = run_pyvmm("boot", str(tmp_path / "nope.qcow2"))
    assert_one_line_error(result, b"DISK", b"nope.qcow2: no such file")


def test_missing_bios(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    result = run_pyvmm("boot", "--bios", str(tmp_path / "bios.bin"), str(disk))
    assert_one_line_error(result, b"--bios", b"bios.bin: no such file")


def test_bios_that_is_not_a_firmware_image(tmp_path):
    disk, bios = tmp_path / "disk.raw", tmp_path / "bios.bin"
    disk.write_bytes(bytes(1 << 20))
    bios.write_bytes(b"not firmware")
    result = run_pyvmm("boot", "--bios", str(bios), str(disk))
    assert_one_line_error(result, b"bios.bin", b"multiple of 4K")


def test_format_without_a_disk():
    result = run_pyvmm("boot", "--format", "qcow2")
    assert_one_line_error(result, b"--format describes DISK")


def test_bios_with_a_kernel(guest, tmp_path):
    result = run_pyvmm("boot", "--bios", str(guest("hello")), "--kernel", str(guest("hello")))
    assert_one_line_error(result, b"--bios", b"excludes --kernel")


def test_flat_guest_with_a_disk(guest, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    result = run_pyvmm("boot", "--flat", str(guest("hello")), str(disk))
    assert_one_line_error(result, b"--flat guests have no virtio devices")
