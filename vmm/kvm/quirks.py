"""Host quirks: what particular KVM implementations cannot do, in one place.

Everything here is a fact about a host, not about pyvmm; each entry says how
it was observed. The rest of the KVM layer asks these functions instead of
testing for hosts itself.

kvm_pvm (`/sys/module/kvm_pvm`) is a software-based KVM for machines that are
themselves virtual machines (the pyvmm development and CI machines). It
emulates guest ring-0 code instruction by instruction, and:
  - cannot emulate `lock cmpxchg16b`, which SLUB uses when CPUID shows CX16;
    hiding CX16 in KVM_SET_CPUID2 avoids it;
  - cannot emulate `xrstor`, and hiding XSAVE in CPUID does not reach the
    guest's `cpuid`; the kernel parameter `noxsave` avoids it;
  - cannot emulate `int3`/`int n` in ring 0 (protected and long mode), which
    every current kernel executes in its alternatives self-test: Linux cannot
    boot on it at all.
"""

from __future__ import annotations

from pathlib import Path

from vmm.cpu_features import FeatureEdit

KVM_PVM_MODULE = Path("/sys/module/kvm_pvm")


def is_kvm_pvm() -> bool:
    return KVM_PVM_MODULE.exists()


def can_run_linux() -> tuple[bool, str]:
    """Whether a Linux kernel can boot on this host's KVM, and if not, why."""
    if is_kvm_pvm():
        return False, ("this host's KVM is kvm_pvm, which cannot emulate int3 or int n in a guest "
                       "kernel (every Linux kernel runs int3 early in boot)")
    return True, ""


def guest_debug_refusals() -> str:
    """What this host's KVM_SET_GUEST_DEBUG cannot do, as one line for the user ("" if nothing).

    Measured on kvm_pvm: single-step and execute breakpoints in DR0-DR3 stop the
    guest; write watchpoints in the same registers never do (its instruction
    emulator does not check data breakpoints); int3 in ring 0 fails to emulate.
    """
    if is_kvm_pvm():
        return ("this host's KVM (kvm_pvm) cannot run int3 in guest ring 0 and does not stop on data "
                "watchpoints: breakpoints use the 4 debug registers, and gdb needs "
                "'set can-use-hw-watchpoints 0' for watchpoints")
    return ""


def cpuid_edits() -> list[FeatureEdit]:
    """CPUID features to hide from guests on this host."""
    if is_kvm_pvm():
        return [FeatureEdit("cx16", False), FeatureEdit("xsave", False)]
    return []


def linux_cmdline_additions() -> list[str]:
    """Kernel parameters a Linux guest on this host's KVM needs to get as far as it can."""
    if is_kvm_pvm():
        return ["noxsave"]
    return []
