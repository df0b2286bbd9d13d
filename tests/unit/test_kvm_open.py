"""Opening /dev/kvm fails with one clear, actionable line for each cause."""

import os

import pytest

from vmm.kvm import fd as kvm_fd
from vmm.kvm import ioctls
from vmm.kvm.fd import KvmSystem, KvmUnavailable


def test_missing_device(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist: enable virtualisation"):
        KvmSystem(str(tmp_path / "kvm"))


def test_permission_denied_says_how_to_fix(monkeypatch):
    def deny(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kvm_fd.os, "open", deny)
    with pytest.raises(KvmUnavailable, match="run as root or add your user to the 'kvm' group"):
        KvmSystem("/dev/kvm")


def _fake_kvm(monkeypatch, tmp_path, answers):
    """Open a plain file and answer ioctls from a table, to reach the later checks."""
    path = tmp_path / "kvm"
    path.write_bytes(b"")

    def fake_ioctl(fd, request, arg=None, what=""):
        if request == ioctls.KVM_CHECK_EXTENSION:
            return answers.get(("cap", int(kvm_fd.ffi.cast("unsigned long", arg))), 1)
        return answers[request]

    monkeypatch.setattr(kvm_fd, "_ioctl", fake_ioctl)
    return str(path)


def test_wrong_api_version(monkeypatch, tmp_path):
    path = _fake_kvm(monkeypatch, tmp_path, {ioctls.KVM_GET_API_VERSION: 11})
    with pytest.raises(KvmUnavailable, match="API version 11, pyvmm needs 12"):
        KvmSystem(path)


def test_missing_capability(monkeypatch, tmp_path):
    path = _fake_kvm(monkeypatch, tmp_path, {ioctls.KVM_GET_API_VERSION: 12, ("cap", 136): 0})
    with pytest.raises(KvmUnavailable, match="lacks KVM_CAP_IMMEDIATE_EXIT"):
        KvmSystem(path)


def test_failed_open_leaks_no_fd(monkeypatch, tmp_path):
    path = _fake_kvm(monkeypatch, tmp_path, {ioctls.KVM_GET_API_VERSION: 11})
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KvmUnavailable):
        KvmSystem(path)
    assert len(os.listdir("/proc/self/fd")) == before
