"""pyvmm run as an ordinary user, for the tests that check it does not need root.

`unprivileged` runs pyvmm as `nobody` (setpriv drops root and every
capability). So that nothing on the host changes, `nobody` gets /dev/kvm
through a device node of its own in a private directory (PYVMM_KVM_DEVICE),
as a member of the kvm group would, and runs a copy of pyvmm and its runtime
packages from that directory, with the system's Python: the checkout and its
.venv may live where `nobody` cannot read (root's home, in CI). The
directory's `work` belongs to `nobody` and is where pyvmm runs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.guest.hello_image import hello_image
from tests.helpers import REPO

USER = "nobody"
SOURCE_PACKAGES = ("vmm", "devices", "boot")
RUNTIME_MODULES = ("unicorn", "cffi", "_cffi_backend", "pycparser", "click", "lz4", "zstandard", "ioctl_opt")


def _copy_runtime(into: Path) -> None:
    """pyvmm's packages and the site-packages it imports at run time (hard links where possible)."""
    import importlib.util

    ignore = shutil.ignore_patterns("__pycache__")
    for package in SOURCE_PACKAGES:
        shutil.copytree(REPO / package, into / package, ignore=ignore)
    site = into / "site"
    site.mkdir()
    for name in RUNTIME_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed"
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, site / name, ignore=ignore)
        else:
            shutil.copy2(origin, site / origin.name)


def _private_directory() -> Path:
    """A directory `nobody` can enter, on a file system that honours device nodes (not nodev)."""
    for parent in ("/tmp", "/var/tmp"):
        home = Path(tempfile.mkdtemp(prefix="pyvmm-unprivileged-", dir=parent))
        probe = home / "probe"
        os.mknod(probe, stat.S_IFCHR | 0o600, os.stat("/dev/kvm").st_rdev)
        try:
            os.close(os.open(probe, os.O_RDWR))
            probe.unlink()
            return home
        except OSError:
            shutil.rmtree(home)
    pytest.fail("no file system under /tmp or /var/tmp lets a device node open (mounted nodev?)")


@pytest.fixture(scope="module")
def unprivileged():
    if os.geteuid() != 0:
        pytest.skip("needs root to set up an unprivileged user's run (pyvmm itself already runs as you)")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing (no KVM on this host)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed: apt-get install util-linux")
    user = pwd.getpwnam(USER)
    home = _private_directory()
    try:
        home.chmod(0o755)
        _copy_runtime(home)
        (home / "hello.bin").write_bytes(hello_image())
        (home / "not-a-kernel").write_bytes(b"pyvmm fails before it reads this\n")
        work = home / "work"
        work.mkdir()
        os.chown(work, user.pw_uid, user.pw_gid)
        kvm = home / "kvm"  # the user's own /dev/kvm: read-write for it alone
        os.mknod(kvm, stat.S_IFCHR | 0o600, os.stat("/dev/kvm").st_rdev)
        os.chown(kvm, user.pw_uid, user.pw_gid)
        root_only_kvm = home / "kvm-root-only"
        os.mknod(root_only_kvm, stat.S_IFCHR | 0o600, os.stat("/dev/kvm").st_rdev)

        def run(*args: str, kvm_device: Path = kvm, timeout: float = 120) -> subprocess.CompletedProcess:
            python = os.path.realpath(sys.executable)  # the system's, not the venv's
            env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": f"{home}:{home / 'site'}",
                   "PYVMM_KVM_DEVICE": str(kvm_device), "PYTHONDONTWRITEBYTECODE": "1"}
            return subprocess.run(["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
                                   "--clear-groups", "--inh-caps=-all", python, *args],
                                  cwd=work, env=env, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)

        run.home = home
        run.work = work
        run.user = user
        run.kvm_root_only = root_only_kvm
        yield run
    finally:
        shutil.rmtree(home, ignore_errors=True)
