"""The CPUID the software-CPU guest sees: what Unicorn emulates, minus what pyvmm cannot back.

The engine's CPU model (Skylake-Server, "GenuineIntel", vmm/tcg/engine.py)
decides which instructions and checks Unicorn's TCG applies. The profile
starts from what its own CPUID returns (probed once per engine) and changes
only what the rest of the emulation decides:

- hidden: AVX (this TCG has no AVX instructions), x2APIC and the TSC
  deadline timer (the local APIC model is xAPIC with a one-shot and periodic
  timer), PCID, MONITOR/MWAIT, VMX/SMX, machine-check architecture (no MCE
  banks behind it), thermal and debug-store features, and of leaf 7 all but
  what is listed in LEAF7_*_KEPT;
- ERMS (and FSRM, with the rest of leaf 7): with it Linux and glibc clear
  and copy with `rep stosb`/`rep movsb`, which this engine runs as one
  translated block per byte. Without it, fast strings being on (the engine
  starts with IA32_MISC_ENABLE's bit 0 set, as firmware leaves a CPU), Linux
  uses `rep stosq`/`rep movsq`, as on QEMU's TCG: clearing the 1 MiB buffer
  of `dd if=/dev/zero` took 0.47-0.56 s of CPU a GiB against 0.84 s with
  Linux's unrolled loops (fast strings off, Unicorn's default) and 2.96-3.16
  s with ERMS;
- XSAVE with the state components this TCG saves and has instructions for
  (x87, SSE, and PKRU for the protection keys), XSAVEOPT and XGETBV 1;
  leaf 0xD's sizes follow the guest's XCR0. Unicorn's XSETBV checks against
  its own table, which also lists AVX's state, so a guest could enable that
  component although CPUID does not offer it;
- OSXSAVE and OSPKE read CR4.OSXSAVE and CR4.PKE at the time of the CPUID, as
  on hardware;
- on the Intel model, the family, model and stepping of a Haswell (Unicorn's
  default model, which pyvmm used before): Linux applies per-model errata and
  mitigations by them, and for a Skylake-Server it warns that the Spectre v2
  mitigation leaves RETBleed open. The engine's behaviour does not depend on
  them (only on the vendor);
- the local APIC bit follows the platform: shown only when the emulated
  interrupt controllers exist;
- topology for N vCPUs: one package of N cores, one thread each, APIC ID =
  vCPU index (leaf 1 EBX, leaf 4 EAX[31:26], leaf 0xB);
- the hypervisor bit, and a hypervisor leaf with pyvmm's own signature
  (Linux knows no such hypervisor and treats the machine as native);
- the TSC: RDTSC runs natively and reads the host's invariant TSC, so the
  guest's TSC is monotonic and identical on every vCPU. Leaf 0x15 gives its
  exact frequency (and the local APIC timer's, as the crystal clock), so
  Linux neither calibrates against the PIT nor the APIC timer; leaf
  0x80000007 marks it invariant. Linux reads leaf 0x15 on Intel CPUs only:
  on the AMD model it calibrates the TSC against the ACPI PM timer
  (devices/acpi_pm.py says why not against the PIT), then the APIC timer
  against the TSC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

from vmm.cpu_features import FeatureEdit, apply_feature_edits, feature_bit

# Leaf 1 ECX / EDX bits; those --cpu-features can name come from its table (vmm/cpu_features.py).
ECX_MONITOR = 1 << 3
ECX_DS_CPL = 1 << 4
ECX_VMX = 1 << 5
ECX_SMX = 1 << 6
ECX_EST = 1 << 7
ECX_TM2 = 1 << 8
ECX_PDCM = 1 << 15
ECX_PCID = feature_bit("pcid")
ECX_X2APIC = feature_bit("x2apic")
ECX_TSC_DEADLINE = feature_bit("tsc_deadline_timer")
ECX_XSAVE = feature_bit("xsave")
ECX_OSXSAVE = 1 << 27
ECX_AVX = feature_bit("avx")
ECX_F16C = feature_bit("f16c")
ECX_HYPERVISOR = feature_bit("hypervisor")
ECX_DTES64 = 1 << 2
EDX_MCE = 1 << 7
EDX_APIC = feature_bit("apic")
EDX_MCA = 1 << 14
EDX_DS = 1 << 21
EDX_ACPI = 1 << 22
EDX_HTT = feature_bit("ht")
EDX_TM = 1 << 29
EDX_PBE = 1 << 31

LEAF1_ECX_HIDDEN = (ECX_MONITOR | ECX_DS_CPL | ECX_VMX | ECX_SMX | ECX_EST | ECX_TM2 | ECX_PDCM
                    | ECX_PCID | ECX_X2APIC | ECX_TSC_DEADLINE | ECX_OSXSAVE | ECX_AVX
                    | ECX_F16C | ECX_DTES64)
LEAF1_EDX_HIDDEN = EDX_MCE | EDX_MCA | EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE | EDX_APIC | EDX_HTT

# Leaf 7: keep what TCG emulates and Linux may use.
LEAF7_EBX_KEPT = (1 << 0) | (1 << 3) | (1 << 7) | (1 << 8) | (1 << 20)  # FSGSBASE BMI1 SMEP BMI2 SMAP
LEAF7_ECX_PKU = 1 << 3
LEAF7_ECX_OSPKE = 1 << 4
CR4_OSXSAVE = 1 << 18
CR4_PKE = 1 << 22

XSAVE_LEAF = 0xD
XSTATE_KEPT = (1 << 0) | (1 << 1) | (1 << 9)  # x87, SSE, PKRU
XSAVE_LEGACY_AREA_AND_HEADER = 512 + 64  # the size x87 and SSE state need
INTEL_SIGNATURE = 0x306C4  # family 6, model 0x3C, stepping 4 (leaf 1 and 0x80000001 EAX)
INTEL = struct.unpack("<III", b"GenuineIntel")
LEAF6_EAX_ARAT = 1 << 2  # the APIC timer keeps running while the vCPU halts
INVARIANT_TSC = 1 << 8  # leaf 0x80000007 EDX

HYPERVISOR_SIGNATURE = b"pyvmmTCGpyvm"
BRAND = b"pyvmm software CPU (Unicorn TCG)"

# The leaves the native CPU model is asked for once, to start from.
PROBED_LEAVES = ((0, 0), (1, 0), (4, 0), (4, 1), (4, 2), (4, 3), (6, 0), (7, 0),
                 (XSAVE_LEAF, 0), (XSAVE_LEAF, 1), (XSAVE_LEAF, 9),
                 (0x80000000, 0), (0x80000001, 0), (0x80000008, 0))

Registers = tuple[int, int, int, int]


class ControlRegisters(Protocol):
    """The running vCPU's state that some CPUID bits report (vmm/tcg/engine.py's Engine)."""

    def cr4(self) -> int: ...

    def xcr0(self) -> int: ...


@dataclass
class CpuidOptions:
    cpus: int = 1
    local_apic: bool = False
    tsc_hz: int | None = None  # the guest's TSC frequency, if measured
    apic_timer_hz: int | None = None  # the local APIC timer's input clock
    edits: list[FeatureEdit] = field(default_factory=list)  # the user's --cpu-features


class CpuidProfile:
    def __init__(self, native: dict[tuple[int, int], Registers], options: CpuidOptions) -> None:
        self.native = native
        self.options = options
        self.max_basic = 0x15 if self._tsc_leaf() else XSAVE_LEAF
        _, b, c, d = self._native(0)
        self.signature = INTEL_SIGNATURE if (b, d, c) == INTEL else self._native(1)[0]

    def lookup(self, vcpu: int, leaf: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        leaf &= 0xFFFFFFFF
        handler = _LEAVES.get(leaf)
        if handler is None:
            return (0, 0, 0, 0)
        values = [v & 0xFFFFFFFF for v in handler(self, vcpu, subleaf & 0xFFFFFFFF, cpu)]
        if self.options.edits:
            apply_feature_edits({(leaf, subleaf): values}, self.options.edits)
        return tuple(values)

    def _native(self, leaf: int, subleaf: int = 0) -> Registers:
        return self.native.get((leaf, subleaf), (0, 0, 0, 0))

    def _tsc_leaf(self) -> Registers | None:
        """TSC = crystal * EBX / EAX. Linux computes crystal_khz * EBX in 32 bits, so
        EBX is kept below 2^32 / crystal_khz: the closest fraction that fits."""
        tsc, crystal = self.options.tsc_hz, self.options.apic_timer_hz
        if not tsc or not crystal or crystal > 0xFFFFFFFF or crystal % 1000:
            return None
        from fractions import Fraction  # (its import costs more than the rest of this module)

        crystal_khz = crystal // 1000
        max_numerator = 0xFFFFFFFF // crystal_khz
        ratio = Fraction(tsc, crystal)
        ratio = ratio.limit_denominator(max(1, int(max_numerator / ratio)))
        while ratio.numerator > max_numerator:
            ratio = ratio.limit_denominator(max(1, ratio.denominator - 1))
        if not ratio.numerator:
            return None
        return (ratio.denominator, ratio.numerator, crystal, 0)

    # -- leaves -------------------------------------------------------------------

    def _leaf_0(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        _, b, c, d = self._native(0)
        return (self.max_basic, b, c, d)

    def _leaf_1(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        _, b, c, d = self._native(1)
        a = self.signature
        cpus = self.options.cpus
        b = (vcpu << 24) | ((cpus if cpus > 1 else 1) << 16) | (b & 0xFF00)
        c = (c & ~LEAF1_ECX_HIDDEN) | ECX_HYPERVISOR
        if c & ECX_XSAVE and cpu.cr4() & CR4_OSXSAVE:
            c |= ECX_OSXSAVE
        d &= ~LEAF1_EDX_HIDDEN
        if self.options.local_apic:
            d |= EDX_APIC
        if cpus > 1:
            d |= EDX_HTT
        return (a, b, c, d)

    def _leaf_4(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        a, b, c, d = self._native(4, subleaf) if subleaf < 4 else (0, 0, 0, 0)
        if a & 0x1F == 0:
            return (0, 0, 0, 0)
        # Bits 25..14 (threads sharing the cache, minus one) stay 0: one thread per core.
        return ((a & 0x3FFF) | (self.options.cpus - 1) << 26, b, c, d)

    def _leaf_6(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        return (LEAF6_EAX_ARAT, 0, 0, 0)

    def _leaf_7(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        if subleaf != 0:
            return (0, 0, 0, 0)
        _, b, c, _ = self._native(7)
        c &= LEAF7_ECX_PKU
        if c and cpu.cr4() & CR4_PKE:
            c |= LEAF7_ECX_OSPKE
        return (0, b & LEAF7_EBX_KEPT, c, 0)

    def _leaf_b(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        cpus = self.options.cpus
        if subleaf == 0:  # SMT level: one thread per core
            return (0, 1, 0x100 | subleaf, vcpu)
        if subleaf == 1:  # core level: all vCPUs in one package
            return ((cpus - 1).bit_length(), cpus, 0x200 | subleaf, vcpu)
        return (0, 0, subleaf, vcpu)

    def _leaf_d(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        components = self._xsave_components()
        if subleaf == 0:
            size_enabled = self._xsave_size(cpu.xcr0() & components)
            return (components, size_enabled, self._xsave_size(components), 0)
        if subleaf == 1:
            return self._native(XSAVE_LEAF, 1)  # XSAVEOPT and XGETBV 1, both in this TCG
        if 2 <= subleaf < 64 and components >> subleaf & 1:
            return self._native(XSAVE_LEAF, subleaf)  # the component's size and offset
        return (0, 0, 0, 0)

    def _xsave_components(self) -> int:
        return self._native(XSAVE_LEAF)[0] & XSTATE_KEPT

    def _xsave_size(self, components: int) -> int:
        """Bytes an XSAVE of `components` writes (the standard, uncompacted format)."""
        ends = [sum(self._native(XSAVE_LEAF, bit)[:2]) for bit in range(2, 64) if components >> bit & 1]
        return max([XSAVE_LEGACY_AREA_AND_HEADER, *ends])

    def _leaf_15(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        return self._tsc_leaf() or (0, 0, 0, 0)

    def _hypervisor(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        b, c, d = struct.unpack("<III", HYPERVISOR_SIGNATURE)
        return (0x40000000, b, c, d)

    def _extended_max(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        _, b, c, d = self._native(0x80000000)
        return (0x80000008, b, c, d)

    def _extended_1(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        _, b, c, d = self._native(0x80000001)
        return (self.signature, b, c, d)

    def _brand(self, part: int) -> Registers:
        text = BRAND.ljust(48, b"\0")[16 * part: 16 * part + 16]
        return struct.unpack("<IIII", text)

    def _power(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        return (0, 0, 0, INVARIANT_TSC)

    def _address_sizes(self, vcpu: int, subleaf: int, cpu: ControlRegisters) -> Registers:
        a, _, _, _ = self._native(0x80000008)
        return (a or 0x3028, 0, 0, 0)


_LEAVES = {
    0: CpuidProfile._leaf_0,
    1: CpuidProfile._leaf_1,
    4: CpuidProfile._leaf_4,
    6: CpuidProfile._leaf_6,
    7: CpuidProfile._leaf_7,
    0xB: CpuidProfile._leaf_b,
    XSAVE_LEAF: CpuidProfile._leaf_d,
    0x15: CpuidProfile._leaf_15,
    0x40000000: CpuidProfile._hypervisor,
    0x80000000: CpuidProfile._extended_max,
    0x80000001: CpuidProfile._extended_1,
    0x80000002: lambda self, vcpu, subleaf, cpu: self._brand(0),
    0x80000003: lambda self, vcpu, subleaf, cpu: self._brand(1),
    0x80000004: lambda self, vcpu, subleaf, cpu: self._brand(2),
    0x80000007: CpuidProfile._power,
    0x80000008: CpuidProfile._address_sizes,
}
