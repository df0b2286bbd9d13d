"""virtio-blk driven by the test kernel's own minimal driver, on every accelerator.

Linux cannot boot on the kvm_pvm hosts, so this is where the KVM fast path
of virtio is exercised: queue notifications through ioeventfd (handled on
the I/O thread, not the vCPU) and the interrupt through irqfd into the
in-kernel I/O APIC. On the software CPU the same device runs from direct
dispatch, through both of virtio-blk's request paths.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_pyvmm
from tests.unit.virtio_driver import blk_requests

# On the software CPU the guest's disk goes through virtio-blk's compiled request path,
# then its Python one (devices/virtio/blk_requests.py); on KVM pyvmm uses the Python path
# only (vmm/builder.py says why).
ACCEL_AND_REQUEST_PATH = pytest.mark.parametrize(("accel", "request_path"), [
    ("tcg", "compiled"), ("tcg", "python"), ("kvm", "python")], indirect=True)


@pytest.fixture
def request_path(request):
    with blk_requests(request.param):
        yield request.param


@ACCEL_AND_REQUEST_PATH
def test_block_read_and_write_with_interrupts(test_kernel, accel, request_path, tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"sector zero from the host".ljust(512, b"\0") + bytes(1 << 20))
    result = run_pyvmm("boot", "--kernel", str(test_kernel), "--accel", accel, "--disk", str(disk),
                       "--cmdline", "testkernel=cpu test.virtio", "--stats", timeout=120)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode()
    assert "virtio: block device at c0000000, version 2" in out
    assert "virtio: capacity 2049 sectors" in out
    assert 'virtio: read sector 0: status 0, data "sector zero from the host"' in out
    assert "virtio: wrote sector 1: status 0, interrupts 2" in out
    assert disk.read_bytes()[512:540] == b"written by the test kernel\0\0"
    assert b"virtio-blk0 at 0xc0000000 gsi 16: requests 2, errors 0" in result.stderr


@ACCEL_AND_REQUEST_PATH
def test_code_read_from_disk_over_code_that_ran_is_the_code_that_runs(test_kernel, accel, request_path, tmp_path):
    # The test kernel reads a function from sector 2 into a page, calls it, reads
    # another from sector 3 into the same page and calls that: a software CPU that
    # kept its translation of the first would return 2 twice.
    disk = tmp_path / "code.raw"
    image = bytearray(64 * 1024)
    image[2 * 512:2 * 512 + 6] = bytes([0xB8, 2, 0, 0, 0, 0xC3])  # mov eax, 2; ret
    image[3 * 512:3 * 512 + 6] = bytes([0xB8, 3, 0, 0, 0, 0xC3])  # mov eax, 3; ret
    disk.write_bytes(image)
    result = run_pyvmm("boot", "--kernel", str(test_kernel), "--accel", accel, "--disk", str(disk),
                       "--cmdline", "testkernel=cpu test.dmacode", timeout=120)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode()
    assert ("virtio: code read from sector 2 (status 0) returned 2, "
            "then from sector 3 (status 0) returned 3") in out
