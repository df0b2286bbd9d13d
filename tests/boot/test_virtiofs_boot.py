"""virtio-fs under the real Debian kernel: `pyvmm boot --fs` shares mounted with mount -t virtiofs."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.boot.virtio_guest import run_guest, script_output

pytestmark = pytest.mark.slow

SCRIPT = """
insmod /lib/modules/fuse.ko && insmod /lib/modules/virtiofs.ko && echo modules-ok
mkdir -p /rw /ro
mount -t virtiofs rwshare /rw && mount -t virtiofs roshare /ro && echo mount-ok
echo "read=$(cat /rw/hello)"
dd if=/dev/urandom of=/rw/big bs=1M count=8 2>/dev/null
echo "big-md5=$(md5sum /rw/big | cut -d' ' -f1)"
mkdir /rw/dir && echo inside > /rw/dir/file && mv /rw/dir/file /rw/dir/moved && ln -s moved /rw/dir/link
echo "via-link=$(cat /rw/dir/link)"
ln /rw/dir/moved /rw/hard && echo "links=$(stat -c %h /rw/hard)"
rm /rw/hard && echo unlink-ok
ls -a /rw/dir | tr '\\n' ' '; echo
echo "ro-read=$(cat /ro/keep)"
echo overwritten > /ro/keep 2>/dev/null || echo ro-write-refused
touch /ro/new 2>/dev/null || echo ro-create-refused
rm /ro/keep 2>/dev/null || echo ro-unlink-refused
mount -o remount,rw /ro 2>/dev/null; echo changed > /ro/keep 2>/dev/null || echo ro-after-remount-refused
echo "escape=$(cat /ro/escape 2>&1 | head -c 40)"
umount /rw && umount /ro && echo umount-ok
"""


def test_shares_read_write_and_read_only(linux_assets, linux_module_tree, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "hello").write_text("from-the-host\n")
    (ro / "keep").write_text("unchanged\n")
    (tmp_path / "secret").write_text("outside\n")
    os.symlink("../secret", ro / "escape")  # the guest resolves it within its own view
    before = sorted(os.listdir(ro)), (ro / "keep").read_bytes()
    fuse = linux_module_tree / "kernel" / "fs" / "fuse"
    modules = {f"/lib/modules/{name}": (fuse / name).read_bytes() for name in ("fuse.ko", "virtiofs.ko")}

    status, stdout, stderr = run_guest(linux_assets, tmp_path, SCRIPT, "--fs", f"{rw},tag=rwshare",
                                       "--fs", f"{ro},tag=roshare,readonly=on", extra_files=modules)
    out = script_output(stdout)
    assert status == 0, stderr
    for line in ("modules-ok", "mount-ok", "read=from-the-host", "via-link=inside", "links=2", "unlink-ok",
                 "ro-read=unchanged", "ro-write-refused", "ro-create-refused", "ro-unlink-refused",
                 "ro-after-remount-refused", "umount-ok"):
        assert line in out, out
    assert ". .. link moved" in out or ". .. moved link" in out, out
    assert f"big-md5={hashlib.md5((rw / 'big').read_bytes()).hexdigest()}" in out
    assert (rw / "dir" / "moved").read_text() == "inside\n" and os.readlink(rw / "dir" / "link") == "moved"
    assert "outside" not in out.split("escape=")[1]
    assert (sorted(os.listdir(ro)), (ro / "keep").read_bytes()) == before
    assert "unsupported" not in stderr, stderr
