"""A qemu-img user's workflow with pyvmm alone, checked with qemu-img too.

Create a qcow2 base, install files into it from a guest, create an overlay
with the base as its backing file, boot from the overlay and change it,
then inspect and check both images with `pyvmm img` and with `qemu-img`.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.boot.virtio_guest import debugfs, host_binary_files, need_tool, run_guest, script_output
from tests.helpers import run_pyvmm

pytestmark = pytest.mark.slow

INSTALL = """
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
{mke2fs} -q -t ext4 -F /dev/vda && echo mkfs-ok
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo mount-ok
echo installed-in-the-base > /mnt/base.txt
umount /mnt && echo umount-ok
"""

USE_OVERLAY = """
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo mount-ok
echo "base-file=$(cat /mnt/base.txt)"
echo written-through-the-overlay > /mnt/overlay.txt
umount /mnt && echo umount-ok
"""


def img(*args: str) -> subprocess.CompletedProcess:
    result = run_pyvmm("img", *args)
    assert result.returncode == 0, result.stderr
    return result


def test_base_overlay_boot_and_check(linux_assets, linux_accel, tmp_path):
    mke2fs = need_tool("mke2fs", "e2fsprogs")
    qemu_img = need_tool("qemu-img", "qemu-utils")
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    extra = host_binary_files(mke2fs)

    img("create", "-f", "qcow2", str(base), "64M")
    status, stdout, stderr = run_guest(linux_assets, tmp_path, INSTALL.format(mke2fs=mke2fs),
                                       "--disk", f"{base},format=qcow2", "--accel", linux_accel,
                                       extra_files=extra)
    assert status == 0, stderr
    assert all(word in script_output(stdout) for word in ("mkfs-ok", "mount-ok", "umount-ok"))

    img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    base_before = base.read_bytes()
    status, stdout, stderr = run_guest(linux_assets, tmp_path, USE_OVERLAY, "--disk", str(overlay),
                                       "--accel", linux_accel)
    assert status == 0, stderr
    out = script_output(stdout)
    assert "base-file=installed-in-the-base" in out and "umount-ok" in out
    assert base.read_bytes() == base_before  # the guest's writes went to the overlay only

    # Both tools find both images consistent and agree on the chain.
    for image in (base, overlay):
        img("check", str(image))
        checked = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    ours = json.loads(img("info", "--output=json", str(overlay)).stdout)
    theirs = json.loads(subprocess.run([qemu_img, "info", "--output=json", str(overlay)],
                                       capture_output=True, text=True, check=True).stdout)
    for field in ("format", "virtual-size", "backing-filename", "backing-filename-format"):
        assert ours[field] == theirs[field], field
    assert theirs["backing-filename"] == str(base)

    # Flattened, the overlay holds both files; the base holds only its own.
    flat_overlay, flat_base = tmp_path / "overlay.raw", tmp_path / "base.raw"
    img("convert", "-f", "qcow2", "-O", "raw", str(overlay), str(flat_overlay))
    img("convert", "-f", "qcow2", "-O", "raw", str(base), str(flat_base))
    assert debugfs(flat_overlay, "cat /overlay.txt") == b"written-through-the-overlay\n"
    assert debugfs(flat_overlay, "cat /base.txt") == b"installed-in-the-base\n"
    assert b"overlay.txt" not in debugfs(flat_base, "ls /")
    compared = subprocess.run([qemu_img, "compare", str(overlay), str(flat_overlay)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout
