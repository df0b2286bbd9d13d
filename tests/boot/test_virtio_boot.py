"""virtio devices under the real Debian kernel: disks, entropy, hvc0, TAP and guest-to-guest networking.

Each test is as few boots as possible and checks as much per boot as it can
(a boot costs tens of seconds on the software CPU). The guest runs a script
(tests/boot/virtio_guest.py) and powers off; the host then checks what the
guest left on its disks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.boot.virtio_guest import (
    debugfs,
    host_binary_files,
    need_tool,
    overlay_initrd,
    pyvmm_command,
    run_guest,
    script_output,
)
from tests.helpers import REPO

pytestmark = pytest.mark.slow

MiB = 1 << 20
RO_CONTENT = b"pyvmm-read-only-disk"


DISK_SCRIPT = """
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
echo "serial-a=$(cat /sys/block/vda/serial) serial-b=$(cat /sys/block/vdb/serial) ro-b=$(cat /sys/block/vdb/ro)"
{mke2fs} -q -t ext4 -F /dev/vda && echo mkfs-ok
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo mount-ok
echo hello-from-the-guest > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/blob bs=64k count=16 2>/dev/null
echo "blob-md5=$(md5sum /mnt/blob | cut -d' ' -f1)"
sync
umount /mnt && echo umount-ok
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo ro-write-accepted; else echo ro-write-refused; fi
echo "ro-content=$(head -c {ro_length} /dev/vdb)"
echo "rng-bytes=$(dd if=/dev/hwrng bs=1024 count=1 2>/dev/null | wc -c)"
echo "rng-current=$(cat /sys/class/misc/hw_random/rng_current)"
timeout 300 sh </dev/hvc0 >/dev/hvc0 2>&1
echo "hvc0-shell-exit=$?"
"""


def test_disks_rng_and_a_shell_on_hvc0(linux_assets, linux_accel, tmp_path):
    mke2fs = need_tool("mke2fs", "e2fsprogs")
    need_tool("debugfs", "e2fsprogs")
    e2fsck = need_tool("e2fsck", "e2fsprogs")
    disk = tmp_path / "vda.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    ro_disk = tmp_path / "vdb.raw"
    ro_disk.write_bytes(RO_CONTENT + bytes(MiB - len(RO_CONTENT)))
    extra = host_binary_files(mke2fs)
    if Path("/etc/mke2fs.conf").exists():
        extra["/etc/mke2fs.conf"] = Path("/etc/mke2fs.conf").read_bytes()

    status, stdout, stderr = run_guest(
        linux_assets, tmp_path, DISK_SCRIPT.format(mke2fs=mke2fs, ro_length=len(RO_CONTENT)),
        "--disk", f"{disk},format=raw,serial=vda-serial", "--disk", f"{ro_disk},readonly=on,serial=RO-DISK",
        "--rng", "--console", "virtio", "--stats", "--accel", linux_accel,
        input=b"echo HVC-$((6*7))\nexit\n", extra_files=extra)
    out = script_output(stdout)
    assert status == 0, stderr
    assert "serial-a=vda-serial serial-b=RO-DISK ro-b=1" in out
    for line in ("mkfs-ok", "mount-ok", "umount-ok", "ro-write-refused",
                 f"ro-content={RO_CONTENT.decode()}", "rng-bytes=1024", "rng-current=virtio_rng.0",
                 "hvc0-shell-exit=0"):
        assert line in out, out
    assert "HVC-42" in stdout  # the hvc0 shell ran the command typed on the host terminal

    # What the guest wrote reached the image, and the filesystem is clean.
    assert debugfs(disk, "cat /hello.txt") == b"hello-from-the-guest\n"
    dumped = tmp_path / "blob"
    debugfs(disk, f"dump /blob {dumped}")
    blob_md5 = out.split("blob-md5=")[1].split()[0]
    assert hashlib.md5(dumped.read_bytes()).hexdigest() == blob_md5
    fsck = subprocess.run([e2fsck, "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert ro_disk.read_bytes()[: len(RO_CONTENT)] == RO_CONTENT
    assert "virtio-blk1" in stderr and "virtio-rng" in stderr  # --stats lists the devices


# -- networking ---------------------------------------------------------------------------

TAP_SERVER = """
import hashlib, socket, sys, threading
data = bytes(range(256)) * 4096
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.0.2.1", port))
    s.listen()
    return s
download, upload = listen(5000), listen(5001)
print("ready", flush=True)
def send():
    conn, _ = download.accept()
    conn.sendall(data)
    conn.close()
threading.Thread(target=send, daemon=True).start()
conn, _ = upload.accept()
digest, total = hashlib.md5(), 0
while chunk := conn.recv(65536):
    digest.update(chunk)
    total += len(chunk)
open(sys.argv[1], "w").write(f"{total} {digest.hexdigest()}")
"""

TAP_SCRIPT = """
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ping -c 5 -A -W 10 10.0.2.1 | tail -2
echo "download-md5=$(nc 10.0.2.1 5000 </dev/null | md5sum | cut -d' ' -f1)"
dd if=/dev/zero bs=64k count=16 2>/dev/null | nc 10.0.2.1 5001 && echo upload-done
echo "features=$(cat /sys/bus/virtio/devices/virtio0/features)"
"""


def test_tap_in_a_network_namespace(linux_assets, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("TAP devices and network namespaces need root")
    ip = need_tool("ip", "iproute2")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing (modprobe tun)")
    namespace = f"pyvmm-vt{os.getpid()}"
    subprocess.run([ip, "netns", "add", namespace], check=True)
    server = None
    try:
        def in_ns(*args: str) -> None:
            subprocess.run([ip, "-n", namespace, *args], check=True)

        in_ns("link", "set", "lo", "up")
        in_ns("tuntap", "add", "dev", "vtap0", "mode", "tap", "vnet_hdr")
        in_ns("addr", "add", "10.0.2.1/24", "dev", "vtap0")
        in_ns("link", "set", "vtap0", "up")
        report = tmp_path / "upload.txt"
        server = subprocess.Popen([ip, "netns", "exec", namespace, sys.executable, "-c", TAP_SERVER, str(report)],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        status, stdout, stderr = run_guest(
            linux_assets, tmp_path, TAP_SCRIPT, "--net", "tap=vtap0,mac=52:54:00:12:34:56",
            prefix=[ip, "netns", "exec", namespace])
        out = script_output(stdout)
        assert status == 0, stderr
        assert "5 packets transmitted, 5 packets received, 0% packet loss" in out, out
        assert f"download-md5={hashlib.md5(bytes(range(256)) * 4096).hexdigest()}" in out, out
        assert "upload-done" in out, out
        server.wait(timeout=30)
        assert report.read_text() == f"{MiB} {hashlib.md5(bytes(MiB)).hexdigest()}"
        features = out.split("features=")[1].split()[0]
        # The TAP took the offloads: checksum both ways and TSO4 both ways were negotiated.
        assert all(features[bit] == "1" for bit in (0, 1, 7, 11)), features
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        subprocess.run([ip, "netns", "del", namespace], check=False)


PEER_SCRIPT = """
ip link set eth0 up
ip addr add {me}/24 dev eth0
i=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && break; done
ping -c 100 -A -W 10 {peer} | tail -2
{handshake}
"""
# The listening guest waits for the other to say it has finished pinging, so
# neither powers off while the other still needs it.
WAIT_FOR_PEER = "nc -l -p 7000 </dev/null && echo peer-done"
TELL_PEER = ("i=0; until echo done | nc {peer} 7000; do sleep 1; i=$((i+1)); [ $i -gt 300 ] && break; done; "
             "echo told-peer")


def test_two_guests_ping_each_other_over_the_socket_backend(linux_assets, linux_accel, tmp_path):
    socket_path = tmp_path / "net.sock"
    scripts = {
        "a": PEER_SCRIPT.format(me="10.0.3.1", peer="10.0.3.2", handshake=WAIT_FOR_PEER),
        "b": PEER_SCRIPT.format(me="10.0.3.2", peer="10.0.3.1", handshake=TELL_PEER.format(peer="10.0.3.1")),
    }
    nets = {"a": f"socket=listen:{socket_path},mac=52:54:00:00:03:01",
            "b": f"socket=connect:{socket_path},mac=52:54:00:00:03:02"}
    guests = {}
    try:
        for name in ("a", "b"):
            initrd = overlay_initrd(linux_assets, scripts[name], tmp_path / f"initrd-{name}.img")
            guests[name] = subprocess.Popen(pyvmm_command(linux_assets, initrd, "--net", nets[name],
                                                          "--accel", linux_accel),
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, cwd=REPO)
            if name == "a":  # the listening side must exist before the other connects
                deadline = time.monotonic() + 60
                while not socket_path.exists():
                    assert guests["a"].poll() is None and time.monotonic() < deadline, "guest a did not start"
                    time.sleep(0.05)
        results = {name: guest.communicate(timeout=900) for name, guest in guests.items()}
    finally:
        for guest in guests.values():
            if guest.poll() is None:
                guest.kill()
                guest.wait()
    for name, guest in guests.items():
        stdout, stderr = (part.decode(errors="replace") for part in results[name])
        out = script_output(stdout)
        assert guest.returncode == 0, stderr
        assert "100 packets transmitted, 100 packets received, 0% packet loss" in out, f"guest {name}:\n{out}"
    assert "peer-done" in script_output(results["a"][0].decode(errors="replace"))
