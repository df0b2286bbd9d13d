"""What the QEMU peer needs to boot the same kernel as reliably as pyvmm does.

QEMU's TCG CPU models describe an AMD CPU without CPUID leaf 0x15, so Linux
calibrates its TSC against the PIT, and under TCG on a busy host that
sometimes fails ("tsc: Unable to calibrate against PIT"), leaving the guest
without a TSC clocksource and the benchmark waiting for a marker that comes
late or never. pyvmm's software CPU (its default Intel model, which the
benchmarks use) announces the TSC rate in CPUID 0x15, so its guest never
calibrates. The peer gets the same rate, measured the same
way, through `tsc_early_khz=` on its command line: neither guest spends boot
time on calibration, and neither can fail at it.
"""

from __future__ import annotations


def tsc_cmdline(accel: str) -> str:
    """Extra kernel parameters for the QEMU guest on `accel` ('' on KVM, where QEMU passes the host's TSC)."""
    if accel != "tcg":
        return ""
    from vmm.tcg.engine import Engine

    engine = Engine()  # measures the host TSC once, as pyvmm does for its guests
    try:
        return f" tsc_early_khz={engine.tsc_hz // 1000}"
    finally:
        engine.close()
