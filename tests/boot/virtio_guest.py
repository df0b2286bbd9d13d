"""Running a shell script inside the Debian test guest with its virtio modules loaded.

The test initramfs (tests/assets.py) is extended, not rebuilt: a second,
uncompressed cpio archive appended to it replaces /init and adds /test.sh
(and any extra files, such as host binaries with their libraries). The
kernel unpacks concatenated archives in order, later files winning.

The replacement /init loads the virtio modules, runs /test.sh with its
output on the serial console between two marker lines, and powers off, so a
test is one `pyvmm boot` whose stdout holds the script's output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.assets import CpioWriter, LinuxAssets
from tests.helpers import REPO

BEGIN = "virtio-test: begin"
END = "virtio-test: end"

INIT = f"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/virtio.order); do insmod $module; done
echo "{BEGIN}"
sh /test.sh 2>&1
echo "{END} $?"
sync
# The serial port sends from interrupts, after the write returned: setting the
# console's own modes again waits (TCSADRAIN) until it has sent everything, or
# the power-off could cut the end line short.
stty -F /dev/console $(stty -F /dev/console -g)
poweroff -f
"""

# Lines the kernel prints on the console while the script runs.
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] .*$", re.MULTILINE)


def host_binary_files(program: str) -> dict[str, bytes]:
    """A host executable and the shared libraries `ldd` says it needs, by absolute path."""
    path = shutil.which(program) or shutil.which(program, path="/sbin:/usr/sbin")
    if path is None:
        return {}
    files = {path: Path(path).read_bytes()}
    listing = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    for match in re.finditer(r"(/\S+\.so[\w.]*)", listing):
        library = match.group(1)
        files[library] = Path(library).read_bytes()
    return files


def overlay_initrd(assets: LinuxAssets, script: str, destination: Path,
                   extra_files: dict[str, bytes] | None = None) -> Path:
    cpio = CpioWriter()
    directories: set[str] = set()
    for name in sorted(extra_files or {}):
        parts = name.strip("/").split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in directories:
                directories.add(directory)
                cpio.directory(directory)
        cpio.file(name.strip("/"), extra_files[name], 0o755)
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("test.sh", script.encode(), 0o755)
    base = assets.initrd.read_bytes()
    # An uncompressed archive after a compressed one must start 4-byte aligned.
    destination.write_bytes(base + bytes(-len(base) % 4) + cpio.finish())
    return destination


def pyvmm_command(assets: LinuxAssets, initrd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmm", "boot", "--kernel", str(assets.kernel), "--initrd", str(initrd),
            "--cmdline", "console=ttyS0 panic=-1 quiet", "--memory", "256M", *args]


def script_output(stdout: str) -> str:
    """What /test.sh printed, without kernel messages; fails if the script did not finish."""
    text = stdout.replace("\r\n", "\n")
    start = text.find(BEGIN)
    end = text.find(END, start)
    assert start >= 0 and end >= 0, f"the test script did not run to the end; guest said:\n{text[-4000:]}"
    return _KERNEL_LINE.sub("", text[start + len(BEGIN) : end])


def run_guest(assets: LinuxAssets, tmp_path: Path, script: str, *args: str, input: bytes = b"",
              extra_files: dict[str, bytes] | None = None, timeout: float = 600,
              prefix: list[str] | None = None) -> tuple[int, str, str]:
    """Boot once; (exit status, everything the guest printed, pyvmm's stderr)."""
    initrd = overlay_initrd(assets, script, tmp_path / f"initrd-{os.getpid()}-{id(script)}.img", extra_files)
    result = subprocess.run([*(prefix or []), *pyvmm_command(assets, initrd, *args)], input=input,
                            capture_output=True, timeout=timeout, cwd=REPO)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def need_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed: apt-get install {package}")
    return path


def debugfs(image: Path, request: str) -> bytes:
    tool = need_tool("debugfs", "e2fsprogs")
    return subprocess.run([tool, "-R", request, str(image)], capture_output=True, check=True).stdout
