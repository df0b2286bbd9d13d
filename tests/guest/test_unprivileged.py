"""pyvmm as an ordinary user: everything works with read-write access to /dev/kvm, and
what needs root (TAP networking) says so in one line (the user's set-up: tests/unprivileged.py).
"""

from __future__ import annotations

import pwd

import pytest

from tests.unprivileged import USER


def test_runs_as_an_unprivileged_user(unprivileged):
    result = unprivileged("-c", "import os, vmm; print(os.geteuid(), os.getegid(), os.getgroups())")
    assert result.stdout.decode().split() == [str(pwd.getpwnam(USER).pw_uid), str(pwd.getpwnam(USER).pw_gid),
                                              "[]"], result


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_boots_a_guest_with_read_write_access_to_kvm(unprivileged, accel):
    result = unprivileged("-m", "vmm", "boot", "--flat", str(unprivileged.home / "hello.bin"), "--accel", accel)
    assert result.returncode == 42, result.stderr
    assert result.stdout == b"Hello from real mode\n"


def test_without_access_to_kvm_auto_uses_the_software_cpu_and_kvm_says_why(unprivileged):
    image = str(unprivileged.home / "hello.bin")
    result = unprivileged("-m", "vmm", "boot", "--flat", image, kvm_device=unprivileged.kvm_root_only)
    assert result.returncode == 42, result.stderr
    assert b"using the software CPU" in result.stderr
    result = unprivileged("-m", "vmm", "boot", "--flat", image, "--accel", "kvm",
                          kvm_device=unprivileged.kvm_root_only)
    assert result.returncode == 1
    assert result.stderr.count(b"\n") == 1 and b"ermission" in result.stderr, result.stderr


def test_disk_images_in_the_users_own_directory(unprivileged):
    assert unprivileged("-m", "vmm", "img", "create", "-f", "qcow2", "disk.qcow2", "16M").returncode == 0
    result = unprivileged("-m", "vmm", "img", "check", "disk.qcow2")
    assert result.returncode == 0, result.stderr


def test_tap_networking_says_it_needs_root(unprivileged):
    result = unprivileged("-m", "vmm", "boot", "--kernel", str(unprivileged.home / "not-a-kernel"),
                          "--accel", "tcg", "--net", "tap=pyvmm-notap")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "root or CAP_NET_ADMIN" in lines[0], result.stderr
