"""`pyvmm boot DISK`: Debian's SeaBIOS boots a disk's own bootloader (syslinux), which boots Linux.

The images are built here from Debian packages (tests/boot/disk_images.py).
The same image booted by QEMU microvm with the same SeaBIOS is the
reference: if it fails there, the image is wrong, not pyvmm.
"""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from bench.qemu_peer import tsc_cmdline
from boot.firmware import DEFAULT_BIOS
from tests.assets import MARKER
from tests.boot.disk_images import isohybrid_iso, need_file, syslinux_disk
from tests.boot.session import PROMPT, GuestSession
from tests.boot.virtio_guest import need_tool
from tests.helpers import kvm_usable, run_pyvmm

pytestmark = pytest.mark.slow

# The guest kernel's command line, in syslinux.cfg. The TSC rate is for QEMU's
# guest (pyvmm's software CPU announces it in CPUID); both guests get it.
# `quiet`: kernel messages printed after init starts (the clocksource switch,
# the virtio modules' notices) would otherwise land in the middle of the
# shell's answers on the same serial console.
APPEND = "console=ttyS0 reboot=acpi panic=-1 quiet"
NO_BOOTABLE_DEVICE_STATUS = 8
# The test initramfs carries the virtio modules without loading them (tests/assets.py).
# (Commands stay shorter than a terminal line: GuestSession.run expects their echo unwrapped.)
LOAD_VIRTIO = "for m in $(cat /lib/modules/virtio.order); do insmod $m; done"
# Bounds against a hang, not expectations: SeaBIOS gives up on an empty disk in
# about 2 s and a boot step takes about 5 s on an idle machine, but a shared
# machine under load (two vCPUs of the software CPU, the guest decompressing
# its own kernel) has taken ten times as long.
FIRMWARE_FAILURE_TIMEOUT = 300  # seconds for SeaBIOS to try every disk and give up
BOOT_TIMEOUT = 300  # seconds for any one step of a boot


@pytest.fixture(scope="module")
def append() -> str:
    return APPEND + tsc_cmdline("tcg")


@pytest.fixture(scope="module")
def raw_disk(linux_assets, tmp_path_factory, append):
    need_file(DEFAULT_BIOS, "seabios")
    return syslinux_disk(tmp_path_factory.mktemp("disk") / "boot.raw", linux_assets.kernel,
                         linux_assets.initrd, append)


@pytest.fixture
def sessions():
    started: list[GuestSession] = []

    def start(*args: str, program: list[str] | None = None) -> GuestSession:
        session = GuestSession(*args, program=program, timeout=BOOT_TIMEOUT)
        started.append(session)
        return session

    yield start
    for session in started:
        session.close()


def to_qcow2(raw, path):
    qemu_img = need_tool("qemu-img", "qemu-utils")
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True,
                   timeout=60)
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def first_sector_md5(raw) -> str:
    with open(raw, "rb") as f:
        return hashlib.md5(f.read(512)).hexdigest()


def check_booted_guest(guest: GuestSession, cpus: int, raw) -> None:
    """SeaBIOS and syslinux ran, Linux reached init with `cpus` CPUs and reads the disk it booted from."""
    before_init = guest.expect(MARKER)
    assert b"SeaBIOS" in before_init and b"Booting from Hard Disk" in before_init
    assert b"SYSLINUX" in before_init  # the disk's own bootloader ran
    guest.expect(PROMPT)
    assert guest.run("nproc").strip() == str(cpus)
    guest.run(LOAD_VIRTIO)
    assert "vda" in guest.run("ls /sys/block").split()
    assert guest.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum").split()[0] == first_sector_md5(raw)


@pytest.mark.parametrize(("image_format", "cpus"), [("raw", 1), ("raw", 2), ("qcow2", 1), ("qcow2", 2)])
def test_disk_boots_through_firmware_and_its_bootloader(sessions, raw_disk, tmp_path, image_format, cpus):
    image = raw_disk if image_format == "raw" else to_qcow2(raw_disk, tmp_path / "boot.qcow2")
    guest = sessions("--accel", "tcg", "--cpus", str(cpus), "-m", "512", str(image))
    check_booted_guest(guest, cpus, raw_disk)
    # -m 512 is MiB, as in QEMU.
    assert 400 * 1024 < int(guest.run("awk '/MemTotal/ {print $2}' /proc/meminfo")) <= 512 * 1024
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr


def test_kernel_and_disk_together_boot_the_kernel_directly_with_the_disk_attached(sessions, linux_assets,
                                                                                   raw_disk):
    guest = sessions("--accel", "tcg", "--kernel", str(linux_assets.kernel), "--initrd",
                     str(linux_assets.initrd), str(raw_disk))
    assert b"SeaBIOS" not in guest.expect(MARKER)
    guest.expect(PROMPT)
    guest.run(LOAD_VIRTIO)
    assert guest.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum").split()[0] == first_sector_md5(raw_disk)
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr


def test_the_same_image_boots_on_qemu_microvm_with_the_same_seabios(sessions, raw_disk):
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    guest = sessions(program=[
        qemu, "-M", "microvm,acpi=on,pit=on,rtc=on", "-accel", "tcg", "-m", "512M", "-smp", "2",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-bios", str(DEFAULT_BIOS), "-drive", f"if=none,id=disk,format=raw,readonly=on,file={raw_disk}",
        "-device", "virtio-blk-device,drive=disk"])
    check_booted_guest(guest, 2, raw_disk)
    guest.send("poweroff")
    status, _ = guest.wait()
    assert status == 0


def test_overlay_boots_and_the_base_stays_unchanged(sessions, raw_disk, tmp_path):
    qemu_img = need_tool("qemu-img", "qemu-utils")
    base = to_qcow2(raw_disk, tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run([qemu_img, "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
                   check=True, capture_output=True, timeout=60)
    base_sum = sha256(base)
    guest = sessions("--accel", "tcg", str(overlay))
    check_booted_guest(guest, 1, raw_disk)
    # In the unpartitioned space after the partition, which nothing else uses.
    spare = raw_disk.stat().st_size // 512 - 8
    guest.run(f"echo via-the-overlay | dd of=/dev/vda seek={spare} conv=fsync")
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr
    assert sha256(base) == base_sum
    flat = tmp_path / "overlay.raw"
    subprocess.run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(flat)], check=True,
                   timeout=60)
    with open(flat, "rb") as f:
        f.seek(spare * 512)
        assert f.read(16) == b"via-the-overlay\n"
    checked = subprocess.run([qemu_img, "check", str(overlay)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_empty_disk_says_no_bootable_device_and_exits_with_its_status(tmp_path, accel):
    # The firmware alone runs on KVM too (real mode, then 32-bit), even on kvm_pvm.
    if accel == "kvm" and (reason := kvm_usable()):
        pytest.skip(reason)
    need_file(DEFAULT_BIOS, "seabios")
    empty = tmp_path / "test.qcow2"
    assert run_pyvmm("img", "create", "-f", "qcow2", str(empty), "10G").returncode == 0
    result = run_pyvmm("boot", "--accel", accel, str(empty), timeout=FIRMWARE_FAILURE_TIMEOUT)
    assert result.returncode == NO_BOOTABLE_DEVICE_STATUS, result.stderr
    assert b"No bootable device." in result.stdout
    assert result.stderr.strip().splitlines()[-1] == b"pyvmm: the firmware found no bootable device"


def test_isohybrid_cdrom_boots_before_the_disk_and_its_files_are_readable(sessions, linux_assets, tmp_path,
                                                                          append):
    """The installer workflow: an empty DISK (vda) and an ISO (vdb), which the firmware boots."""
    need_file(DEFAULT_BIOS, "seabios")
    token = f"pyvmm-iso-file-{time.time_ns()}"
    iso = isohybrid_iso(tmp_path / "live.iso", linux_assets.kernel, linux_assets.initrd, append,
                        {"hello.txt": token.encode() + b"\n"})
    empty = tmp_path / "disk.qcow2"
    assert run_pyvmm("img", "create", "-f", "qcow2", str(empty), "1G").returncode == 0
    guest = sessions("--accel", "tcg", "--cdrom", str(iso), str(empty))
    before_init = guest.expect(MARKER)
    assert b"ISOLINUX" in before_init and b"not a bootable disk" not in before_init
    guest.expect(PROMPT)
    guest.run(LOAD_VIRTIO)
    assert guest.run("ls /sys/block").split() == ["vda", "vdb"]
    # The ISO is the second disk, read-only, with hello.txt's bytes on it.
    assert guest.run("cat /sys/block/vdb/ro").strip() == "1"
    assert guest.run(f"grep -c -a {token} /dev/vdb").strip() == "1"
    guest.send("poweroff")
    status, stderr = guest.wait()
    assert status == 0, stderr
