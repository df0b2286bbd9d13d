"""The guest's CPUID table, built from what KVM reports it can virtualise.

Never from a hard-coded list: KVM_GET_SUPPORTED_CPUID already masks what
this host (and this KVM) cannot give a guest. Per vCPU we only fill in the
identity fields (APIC IDs) and the topology.
"""

from __future__ import annotations

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


def cpuid_for_vcpu(supported: list[CpuidEntry], index: int, cpus: int) -> list[CpuidEntry]:
    result = []
    for function, sub, flags, eax, ebx, ecx, edx in supported:
        if function == 0x1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            ebx = (ebx & 0x0000FFFF) | (min(cpus, 255) << 16) | ((index & 0xFF) << 24)
            if cpus > 1:
                edx |= 1 << 28  # HTT: the package has more than one logical processor
        elif function in (0xB, 0x1F):
            edx = index  # x2APIC ID of this logical processor
        result.append((function, sub, flags, eax, ebx, ecx, edx))
    return result
