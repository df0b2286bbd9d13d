"""The reset control register, the reset stub, the reboot parameters pyvmm adds, and the
status a reset ends the VM with."""

from __future__ import annotations

import pytest

from boot.reboot_params import BIOS_RESET_FLAG_ADDRESS, WARM_RESET_FLAG, add_reboot_params
from boot.reset_stub import RESET_STUB, install_reset_stub
from devices.legacy import ResetControlRegister
from vmm.errors import PyvmmError
from vmm.guest_reset import GuestResets
from vmm.layout import REAL_MODE_RESET_VECTOR, RESET_VECTOR
from vmm.lifecycle import StopController
from vmm.memory import GuestMemory


def test_linux_reboot_pci_sequence_resets_on_the_second_write():
    resets = []
    device = ResetControlRegister(lambda: resets.append(1))
    cf9 = device.read(0, 1)
    device.write(0, 1, cf9 | 0x02)
    assert resets == [] and device.read(0, 1) == 0x02
    device.write(0, 1, cf9 | 0x06)
    assert resets == [1]
    device.write(0, 1, RESET_STUB[RESET_STUB.index(0xB0) + 1])  # the stub's value resets too
    assert resets == [1, 1]


def test_the_stub_sits_at_both_reset_vectors():
    memory = GuestMemory(2 << 20)
    try:
        install_reset_stub(memory)
        assert memory.read(REAL_MODE_RESET_VECTOR, len(RESET_STUB)) == RESET_STUB
        assert memory.read(RESET_VECTOR, len(RESET_STUB)) == RESET_STUB
        assert len(RESET_STUB) <= 16  # it must fit below 1 MiB and below 4 GiB
        with pytest.raises(PyvmmError):
            memory.add_firmware(RESET_VECTOR & ~0xFFF, b"\x90")  # firmware may not overlap firmware
    finally:
        memory.close()


@pytest.mark.parametrize(("cmdline", "expected", "panic_flag"), [
    ("console=ttyS0", "console=ttyS0 panic=-1 reboot=panic_warm", True),
    ("console=ttyS0 panic=10 reboot=bios", "console=ttyS0 panic=10 reboot=bios reboot=panic_warm", True),
    ("console=ttyS0 reboot=w,acpi", "console=ttyS0 reboot=w,acpi panic=-1 reboot=panic_warm", False),
    ("console=ttyS0 reboot=panic_cold", "console=ttyS0 reboot=panic_cold panic=-1", False),
    ("console=ttyS0 reboot=a,panic_warm panic=0", "console=ttyS0 reboot=a,panic_warm panic=0", True),
    ("console=ttyS0 -- init-arg panic=3", "console=ttyS0 panic=-1 reboot=panic_warm -- init-arg panic=3", True),
    ("", "panic=-1 reboot=panic_warm", True),
])
def test_reboot_params_are_added_only_where_the_user_did_not_choose(cmdline, expected, panic_flag):
    params = add_reboot_params(cmdline)
    assert params.cmdline == expected
    assert params.warm_reset_means_panic is panic_flag


def reset_status(flag: int, warm_reset_means_panic: bool, triple: bool = False) -> tuple[int, str]:
    memory, stop = GuestMemory(1 << 20), StopController()
    try:
        memory.write_u16(BIOS_RESET_FLAG_ADDRESS, flag)
        resets = GuestResets(stop, memory, warm_reset_means_panic)
        resets.triple_fault(0) if triple else resets.reset("the ACPI reset register")
        return stop.status, stop.reason
    finally:
        memory.close()


def test_a_warm_reset_after_panic_ends_with_the_panic_status():
    assert reset_status(WARM_RESET_FLAG, True) == (
        4, "the guest kernel panicked (and reset the machine through the ACPI reset register)")
    assert reset_status(WARM_RESET_FLAG, True, triple=True)[0] == 4


def test_a_cold_reset_or_an_unmarked_machine_ends_with_the_reboot_status():
    assert reset_status(0, True) == (7, "the guest asked for a reset (through the ACPI reset register)")
    assert reset_status(WARM_RESET_FLAG, False)[0] == 7
    assert reset_status(0, True, triple=True) == (3, "vCPU 0: the guest triple-faulted")
