"""The guest CPUID: identity, topology, quirks and user edits on top of KVM's supported table."""

import pytest

from vmm.cpu_features import FeatureEdit, parse_feature_edits
from vmm.errors import PyvmmError
from vmm.kvm.cpuid import beyond_kvm, cpuid_for_vcpu

SUPPORTED = [
    (0x0, 0, 0, 0x1C, 0x68747541, 0x444D4163, 0x69746E65),
    (0x1, 0, 0, 0xA10F11, 0x01020800, 0x81202000, 0x078BFBFF),
    (0x7, 0, 1, 0, 0x1800002, 0x104, 0x20000000),
    (0xB, 0, 1, 0, 0, 0, 1),
    (0x80000008, 0, 0, 0x3030, 0x50020005, 0x7001, 0),
    (0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
]


def leaf(entries, function, index=0):
    for f, i, _flags, eax, ebx, ecx, edx in entries:
        if (f, i) == (function, index):
            return eax, ebx, ecx, edx
    raise KeyError(hex(function))


@pytest.mark.parametrize("index", [0, 1, 5])
def test_apic_ids(index):
    entries = cpuid_for_vcpu(SUPPORTED, index, 8)
    assert leaf(entries, 1)[1] >> 24 == index
    assert leaf(entries, 0xB, 0)[3] == index
    assert leaf(entries, 0xB, 1)[3] == index


def test_topology_counts_every_vcpu():
    entries = cpuid_for_vcpu(SUPPORTED, 0, 6)
    assert (leaf(entries, 1)[1] >> 16) & 0xFF == 8          # addressable IDs: next power of two
    assert leaf(entries, 0xB, 1)[:2] == (3, 6)               # 3 APIC-ID bits, 6 logical processors
    assert leaf(entries, 0x80000008)[2] & 0xFF == 5          # AMD: cores - 1
    assert (leaf(entries, 0x80000008)[2] >> 12) & 0xF == 3


def test_kvm_paravirtual_leaves_are_kept():
    entries = cpuid_for_vcpu(SUPPORTED, 0, 1)
    assert leaf(entries, 0x40000000)[1:] == (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM"


def test_edits_remove_features_and_add_only_what_kvm_can_give():
    # SUPPORTED's leaf 1 ECX has CX16 and x2APIC, not XSAVE.
    edits = [FeatureEdit("cx16", False), FeatureEdit("xsave", True), FeatureEdit("x2apic", True)]
    ecx = leaf(cpuid_for_vcpu(SUPPORTED, 0, 1, edits), 1)[2]
    assert not ecx & (1 << 13)
    assert ecx & (1 << 21)
    # KVM would show XSAVE yet refuse CR4.OSXSAVE: left out, as QEMU does.
    assert not ecx & (1 << 26)


def test_additions_kvm_cannot_give_are_named():
    # Leaf 1 ECX without PCID or TSC-deadline; leaf 7 EBX without INVPCID.
    supported = [(0x1, 0, 0, 0xA10F11, 0x01020800, 0x00202000, 0x078BFBFF), (0x7, 0, 1, 0, 0x1800002, 0x104, 0)]
    edits = parse_feature_edits("+pcid,+x2apic,-cx16,+tsc_deadline_timer,+hypervisor,+invpcid,+smep")
    assert [edit.name for edit in beyond_kvm(supported, edits)] == ["pcid", "tsc_deadline_timer", "invpcid", "smep"]
    # TSC-deadline is the VMM's to give where KVM_CAP_TSC_DEADLINE_TIMER says KVM can.
    assert [edit.name for edit in beyond_kvm(supported, edits, tsc_deadline=True)] == ["pcid", "invpcid", "smep"]
    ecx = leaf(cpuid_for_vcpu(supported, 0, 1, edits), 1)[2]
    assert not ecx & (1 << 17) and not ecx & (1 << 24)


def test_parse_feature_edits():
    assert parse_feature_edits("-avx, +x2apic,pcid") == [
        FeatureEdit("avx", False), FeatureEdit("x2apic", True), FeatureEdit("pcid", True)]
    with pytest.raises(PyvmmError, match="unknown CPU feature 'warp'"):
        parse_feature_edits("-warp")


def test_gsi_routing_matches_the_madt_override():
    from vmm.kvm import uapi as k
    from vmm.kvm.irq import pc_gsi_routing

    routes = pc_gsi_routing()
    ioapic = {gsi: pin for gsi, chip, pin in routes if chip == k.KVM_IRQCHIP_IOAPIC}
    assert ioapic[0] == 2                       # the PIT: IRQ0 -> I/O APIC pin 2
    assert ioapic[4] == 4 and ioapic[23] == 23  # everything else straight through
    assert 2 not in ioapic                      # pin 2 has only the PIT
    pics = {(gsi, chip, pin) for gsi, chip, pin in routes if chip != k.KVM_IRQCHIP_IOAPIC}
    assert (0, k.KVM_IRQCHIP_PIC_MASTER, 0) in pics and (8, k.KVM_IRQCHIP_PIC_SLAVE, 0) in pics
    assert not any(gsi == 2 for gsi, _, _ in pics)  # IRQ2 is the cascade


def test_the_vmm_sets_the_hypervisor_bit_and_tsc_deadline_when_kvm_can_do_it():
    # KVM before Linux 6.14 reports neither bit in leaf 1 ECX.
    supported = [(0x1, 0, 0, 0xA10F11, 0x01020800, 0x00202000, 0x078BFBFF)]
    assert leaf(cpuid_for_vcpu(supported, 0, 1), 1)[2] & (1 << 31)
    assert not leaf(cpuid_for_vcpu(supported, 0, 1), 1)[2] & (1 << 24)
    assert leaf(cpuid_for_vcpu(supported, 0, 1, tsc_deadline=True), 1)[2] & (1 << 24)
    # The user still has the last word.
    edited = cpuid_for_vcpu(supported, 0, 1, [FeatureEdit("hypervisor", False)], tsc_deadline=True)
    assert not leaf(edited, 1)[2] & (1 << 31)


def test_leaf_0x1f_gets_its_core_level_like_0xb():
    entries = cpuid_for_vcpu(SUPPORTED + [(0x1F, 0, 1, 0, 0, 0, 1)], 3, 4)
    assert leaf(entries, 0x1F, 0) == (0, 1, (1 << 8), 3)
    assert leaf(entries, 0x1F, 1) == (2, 4, (2 << 8) | 1, 3)


def test_cache_sharing_is_per_core_below_l3_and_every_vcpu_at_l3():
    l1d = 0x1C004121  # type 1, level 1, self-initialising; host says 2 threads share it
    l3 = 0x3C07C163   # type 3, level 3; host says 32 threads share it
    entries = cpuid_for_vcpu(SUPPORTED + [(0x4, 0, 1, l1d, 0, 0, 0), (0x4, 3, 1, l3, 0, 0, 0)], 0, 6)
    assert (leaf(entries, 4, 0)[0] >> 14) & 0xFFF == 0
    assert (leaf(entries, 4, 3)[0] >> 14) & 0xFFF == 7       # 3 APIC-ID bits: 8 IDs
    assert leaf(entries, 4, 0)[0] >> 26 == 7
    assert leaf(entries, 4, 0)[0] & 0x3FFF == l1d & 0x3FFF    # type, level and flags kept


def test_amx_tile_config_without_tile_data_is_withdrawn():
    half = (0xD, 0, 1, 0x200E7, 0x980, 0x980, 0)       # XTILECFG (17) without XTILEDATA (18)
    both = (0xD, 0, 1, 0x600E7, 0x2B00, 0x2B00, 0)
    assert leaf(cpuid_for_vcpu([half], 0, 1), 0xD)[0] == 0xE7
    assert leaf(cpuid_for_vcpu([both], 0, 1), 0xD)[0] == 0x600E7
