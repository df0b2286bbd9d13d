"""The guest's CPUID table, built from what KVM reports it can virtualise.

Never from a hard-coded list: KVM_GET_SUPPORTED_CPUID already masks what this
host (and this KVM) cannot give a guest, and keeps KVM's paravirtual leaves
(0x40000000: "KVMKVMKVM", 0x40000001: PV features). Per vCPU we fill in the
identity and topology fields, then apply host quirks and the user's edits.

Topology: every vCPU is one core of one socket, one thread per core, and
its APIC ID is its index.

Two leaf-1 bits are the VMM's to set, because KVM reported neither before
Linux 6.14 (api.rst, "Known KVM API problems"): the hypervisor bit, without
which a Linux guest never looks at the KVM leaves (no kvmclock, no PV
features, TSC calibrated against the PIT), and TSC-deadline, which KVM's
in-kernel local APIC provides whenever KVM_CAP_TSC_DEADLINE_TIMER says so.

A feature the user adds (`--cpu-features +pcid`) that KVM does not report is
left out, as QEMU leaves it out ("host doesn't support requested feature"):
KVM would show the bit but refuse what it promises (where KVM has no PCID,
setting CR4.PCIDE raises #GP), so a guest that trusts CPUID fails.
"""

from __future__ import annotations

from vmm.cpu_features import REGISTER_INDEX, FeatureEdit, apply_feature_edits, feature_bit

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


def _bits_for(count: int) -> int:
    """How many APIC-ID bits `count` IDs need."""
    return max(count - 1, 0).bit_length()


HYPERVISOR = feature_bit("hypervisor")  # leaf 1 ECX
TSC_DEADLINE = feature_bit("tsc_deadline_timer")  # leaf 1 ECX
HTT = feature_bit("ht")  # leaf 1 EDX
XTILECFG, XTILEDATA = 1 << 17, 1 << 18  # leaf 0xD subleaf 0 EAX: the two AMX state components


def beyond_kvm(supported: list[CpuidEntry], edits: list[FeatureEdit], *,
               tsc_deadline: bool = False) -> list[FeatureEdit]:
    """The additions among `edits` that KVM cannot give a guest: not in its supported table, nor
    set by the VMM itself (hypervisor, HTT, and TSC-deadline where `tsc_deadline`)."""
    registers = {(f, i): [eax, ebx, ecx, edx] for f, i, _, eax, ebx, ecx, edx in supported}
    vmms_own = {"hypervisor", "ht"} | ({"tsc_deadline_timer"} if tsc_deadline else set())
    beyond = []
    for edit in edits:
        if not edit.enable or edit.name in vmms_own:
            continue
        leaf, subleaf, register, bit = edit.location
        values = registers.get((leaf, subleaf))
        if values is None or not values[REGISTER_INDEX[register]] >> bit & 1:
            beyond.append(edit)
    return beyond


def cpuid_for_vcpu(supported: list[CpuidEntry], index: int, cpus: int,
                   edits: list[FeatureEdit] = (), *, tsc_deadline: bool = False) -> list[CpuidEntry]:
    core_bits = _bits_for(cpus)
    registers = {(f, i): [eax, ebx, ecx, edx] for f, i, _, eax, ebx, ecx, edx in supported}
    flags = {(f, i): fl for f, i, fl, *_ in supported}

    for (function, sub), regs in registers.items():
        if function == 0x1:
            # EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processors.
            regs[1] = (regs[1] & 0x0000FFFF) | (min(1 << core_bits, 255) << 16) | ((index & 0xFF) << 24)
            regs[3] |= HTT  # the EBX[23:16] count is valid
            regs[2] |= HYPERVISOR | (TSC_DEADLINE if tsc_deadline else 0)
        elif function == 0x4:
            # Intel deterministic cache parameters: EAX[31:26] cores per package - 1,
            # EAX[25:14] logical processors sharing the cache - 1: a core's own
            # L1 and L2 (one thread each), the L3 shared by every vCPU.
            if regs[0] & 0x1F:
                level = (regs[0] >> 5) & 0x7
                sharing = (1 << core_bits) - 1 if level >= 3 else 0
                regs[0] = (regs[0] & 0x3FFF) | (sharing << 14) | (((1 << core_bits) - 1) << 26)
        elif function == 0xD and sub == 0 and not regs[0] & XTILEDATA:
            # KVM 5.17-6.3 on AMX hosts offers XTILECFG without XTILEDATA unless
            # the VMM asked for AMX first; XSETBV with that pair raises #GP.
            regs[0] &= ~XTILECFG
        elif function in (0xB, 0x1F):
            # Extended topology: level 0 is SMT (1 thread/core), level 1 is the core level.
            if sub == 0:
                regs[:] = [0, 1, (1 << 8) | sub, index]
            elif sub == 1:
                regs[:] = [core_bits, cpus, (2 << 8) | sub, index]
            else:
                regs[:] = [0, 0, sub, index]
        elif function == 0x80000008:
            # AMD: ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
            regs[2] = (regs[2] & ~0xF0FF) | (core_bits << 12) | (cpus - 1)
        elif function == 0x8000001E:
            # AMD extended APIC ID, core ID, one thread per core.
            regs[:] = [index, index & 0xFF, 0, 0]

    # Leaves 0xB and 0x1F need their core level even where KVM (6.2 and later)
    # lists only subleaf 0; Linux prefers 0x1F when the host has it.
    for function in (0xB, 0x1F):
        if (function, 0) in registers and (function, 1) not in registers:
            registers[(function, 1)] = [core_bits, cpus, (2 << 8) | 1, index]
            flags[(function, 1)] = flags[(function, 0)]

    left_out = beyond_kvm(supported, list(edits), tsc_deadline=tsc_deadline)
    apply_feature_edits(registers, [edit for edit in edits if edit not in left_out])
    return [(f, i, flags[(f, i)], *regs) for (f, i), regs in registers.items()]
