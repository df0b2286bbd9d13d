"""Inside L1: keep KVM's static keys still, so L1's kernel text is never rewritten while tests run.

Run by L1's /init (`python kvm_static_keys.py hold`, tests/nested/l1_run.py) before anything
else uses /dev/kvm; stdlib only, so it runs without the project on sys.path.

Why. KVM flips static keys as VMs and vCPUs come and go, and Linux rewrites
each of their sites in the kernel text live (`text_poke_bp`: an int3 on the
first byte, the rest, then the first byte). QEMU 7.2's threaded software CPU
(L1's CPU) can keep a translation made while the int3 was there after the
byte is rewritten: the vCPU then traps on an int3 that memory no longer holds,
Linux finds no int3 and returns to retry it, forever. The keys:

- `preempt_notifier_key` (the first VM made, the last destroyed): sites in
  `__schedule`. An L1 creating and destroying VMs in a loop hung in 2 runs of 2.
- `apic_sw_disabled` (on while any vCPU's local APIC is software-disabled:
  from its creation until its guest enables it, and again from the guest's
  power-off), `apic_hw_disabled` (the APIC base MSR's enable bit clear) and
  `kvm_has_noapic_vcpu` (a vCPU of a VM without the in-kernel irqchip): sites
  all over KVM's vCPU run path, which the other L1 vCPU runs for L2 while the
  key flips. Every L2 boot flips `apic_sw_disabled` (its vCPUs are made with
  the APIC disabled, its kernel enables them, and disables them at power-off;
  with only an empty VM held, `check` saw a vCPU with an APIC rewrite KVM's
  text). With only an empty VM held, a thread making and destroying VMs of one vCPU without an
  irqchip beside an L2 boot hung L1 in both runs, within a minute: RCU stall,
  pyvmm's vCPU thread looping through `asm_exc_int3` at
  `kvm_arch_vcpu_ioctl_run+0x78a`, where memory held the 5-byte NOP once and
  the jump the other time. L2 froze, the symptom of the tier's `[kvm-1]`
  failure in CI (pyvmm busy on one L1 CPU, L2 silent).

A key that is on stays on while anyone holds it: `hold` opens one VM with the
in-kernel irqchip whose one vCPU, never run, has its APIC software-disabled (as
created) and hardware-disabled, and one VM without an irqchip with one vCPU.
Every count then stays at one or more, and no VM or vCPU a test makes or
destroys, and nothing its guest does to its APIC, rewrites a byte of text.
`text_rewritten_by_new_vms` checks exactly that, reading the text in /proc/kcore.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_CREATE_IRQCHIP = 0xAE01, 0xAE41, 0xAE60
KVM_SET_MSRS = 0x4008AE89  # _IOW(KVMIO, 0x89, struct kvm_msrs)
MSR_IA32_APICBASE = 0x1B
APIC_BASE_DISABLED = 0xFEE00000  # the default base, enable bit (11) clear
HELD = Path("/tmp/vm-held")  # written once the keys are held: /init waits for it


def _vm_with_a_vcpu(kvm: int, irqchip: bool) -> tuple[int, int]:
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    if irqchip:
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    return vm, fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)


def _disable_apic(vcpu: int) -> None:
    msrs = bytearray(struct.pack("<IIIIQ", 1, 0, MSR_IA32_APICBASE, 0, APIC_BASE_DISABLED))  # kvm_msrs, 1 entry
    if fcntl.ioctl(vcpu, KVM_SET_MSRS, msrs) != 1:
        raise OSError("KVM_SET_MSRS did not take the APIC base")


def hold_keys(kvm: int) -> list[int]:
    """Open what keeps every key on; the file descriptors (closing them lets the keys go)."""
    vm, vcpu = _vm_with_a_vcpu(kvm, irqchip=True)  # apic_sw_disabled (and preempt notifiers)
    _disable_apic(vcpu)  # apic_hw_disabled
    bare_vm, bare_vcpu = _vm_with_a_vcpu(kvm, irqchip=False)  # kvm_has_noapic_vcpu
    return [vm, vcpu, bare_vm, bare_vcpu]


# -- the check -------------------------------------------------------------------------------


def _text_ranges() -> dict[str, tuple[int, int]]:
    """The kernel's text and KVM's modules' text: name -> (start, end), from /proc/kallsyms."""
    ranges: dict[str, list[int]] = {}
    core: dict[str, int] = {}
    for line in Path("/proc/kallsyms").read_text().splitlines():
        match = re.match(r"([0-9a-f]+) ([tT]) (\S+)(?:\s+\[(\S+)\])?", line)
        if not match:
            continue
        address, _, name, module = int(match.group(1), 16), *match.group(2, 3, 4)
        if module in ("kvm", "kvm_amd"):
            low_high = ranges.setdefault(module, [address, address])
            low_high[0], low_high[1] = min(low_high[0], address), max(low_high[1], address)
        elif module is None and name in ("_stext", "_etext"):
            core[name] = address
    found = {name: (low, high) for name, (low, high) in ranges.items()}
    found["kernel"] = (core["_stext"], core["_etext"])
    if not all(start for start, _ in found.values()):
        raise OSError("/proc/kallsyms hides addresses (not root?)")
    return found


def _read_kernel(kcore, address: int, length: int) -> bytes:
    """`length` bytes at a kernel virtual address, from /proc/kcore's ELF program headers."""
    kcore.seek(0)
    header = kcore.read(64)
    (phoff,) = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    kcore.seek(phoff)
    table = kcore.read(phentsize * phnum)
    for index in range(phnum):
        p_type, _, offset, vaddr, _, _, memsz, _ = struct.unpack_from("<IIQQQQQQ", table, index * phentsize)
        if p_type == 1 and vaddr <= address and address + length <= vaddr + memsz:  # PT_LOAD
            kcore.seek(offset + address - vaddr)
            return kcore.read(length)
    raise OSError(f"/proc/kcore does not cover {address:#x}+{length:#x}")


def _text_digests(kcore, ranges: dict[str, tuple[int, int]]) -> dict[str, str]:
    return {name: hashlib.sha256(_read_kernel(kcore, start, end - start)).hexdigest()
            for name, (start, end) in ranges.items()}


def text_rewritten_by_new_vms() -> list[str]:
    """What a test's VMs could do that rewrote the kernel's or KVM's text, as "what: where" lines."""
    ranges = _text_ranges()
    kvm = os.open("/dev/kvm", os.O_RDWR)

    def empty_vm() -> list[int]:
        return [fcntl.ioctl(kvm, KVM_CREATE_VM, 0)]

    def apic_vcpu() -> list[int]:
        return list(_vm_with_a_vcpu(kvm, irqchip=True))

    def apic_disabled_vcpu() -> list[int]:
        fds = apic_vcpu()
        _disable_apic(fds[1])
        return fds

    def vcpu_without_irqchip() -> list[int]:
        return list(_vm_with_a_vcpu(kvm, irqchip=False))

    actions: dict[str, Callable[[], list[int]]] = {
        "an empty VM": empty_vm, "a vCPU with a local APIC": apic_vcpu,
        "a vCPU with its local APIC disabled": apic_disabled_vcpu,
        "a vCPU without the in-kernel irqchip": vcpu_without_irqchip}
    rewritten = []
    try:
        with open("/proc/kcore", "rb") as kcore:
            for what, make in actions.items():
                before = _text_digests(kcore, ranges)
                fds = make()
                try:  # a key goes on at once (it goes off a second after the last user goes)
                    during = _text_digests(kcore, ranges)
                finally:
                    for fd in reversed(fds):
                        os.close(fd)
                rewritten += [f"{what}: {name}" for name in ranges if before[name] != during[name]]
    finally:
        os.close(kvm)
    return rewritten


def main() -> int:
    if sys.argv[1:] == ["hold"]:
        kvm = os.open("/dev/kvm", os.O_RDWR)
        hold_keys(kvm)
        HELD.write_text(f"{os.getpid()}\n")
        while True:
            time.sleep(1e6)
    if sys.argv[1:] == ["check"]:
        rewritten = text_rewritten_by_new_vms()
        print("\n".join(rewritten) or "no text rewritten")
        return 1 if rewritten else 0
    print("usage: kvm_static_keys.py hold|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
