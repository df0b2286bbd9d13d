"""Telling a stuck vCPU from a running one, and saying so once."""

from __future__ import annotations

from vmm.layout import REAL_MODE_RESET_VECTOR, RESET_VECTOR
from vmm.stuck_vcpu import StuckVcpuWatch, stuck_at


def test_stuck_places():
    assert stuck_at(REAL_MODE_RESET_VECTOR, b"\xeb\xfe") == "spinning at the reset vector"
    assert stuck_at(0x30000, bytes(15)) == "executing an all-zero page"


def test_running_code_is_not_stuck():
    # A vCPU not started yet (an AP waiting for SIPI) sits at 0xFFFFFFF0, on the reset stub.
    assert stuck_at(RESET_VECTOR, bytes.fromhex("fab2f9b60cb00eeef4ebfd")) is None
    assert stuck_at(0x10000, b"\xb0\x2a\xe6\xf4" + bytes(11)) is None
    assert stuck_at(0x30000, bytes(4)) is None  # too little code readable to tell (end of a page)
    assert stuck_at(0x30000, b"") is None


class FakeVcpu:
    index = 1

    def __init__(self, linear, code):
        self.linear, self.code, self.looks = linear, code, 0

    def code_at_rip(self):
        self.looks += 1
        return self.linear, self.code


def test_each_vcpu_is_reported_once():
    reports = []
    watch = StuckVcpuWatch(reports.append)
    vcpu = FakeVcpu(0x1234, bytes(15))
    for _ in range(3):
        watch.look(vcpu)
    assert reports == ["vCPU 1 is executing an all-zero page (RIP 0x1234): the guest looks stuck"]
    assert vcpu.looks == 1  # no more reading once reported
