"""kvm-unit-tests that pass on pyvmm, as a regression set (part of `make test`).

The lists hold the tests that passed on pyvmm, on each accelerator, in the
last full side-by-side run (`make kvm-unit-tests`, figures in docs/kvm-unit-tests.md),
short enough for CI; each must keep passing. The suite is built once from
the shared tarball into ~/.cache/pyvmm-kut (about a minute on two cores).

On KVM what can pass depends on the host's CPU as well: `la57` passed on an
AMD EPYC's KVM and fails on an Intel Xeon's without LA57, under QEMU
-enable-kvm too (docs/kvm-unit-tests.md). So a KVM test pyvmm does not pass
runs on QEMU on the same KVM, and passes only where QEMU ran it and failed
the same checks: pyvmm must pass wherever QEMU passes on this host.
"""

from __future__ import annotations

import pytest

from tests.conformance.kut import run_test
from tests.conformance.suite import FAIL, PASS, TIMEOUT, SuiteUnavailable, build_suite, read_tests
from tests.helpers import kvm_usable

REGRESSION_SET = {
    "tcg": ["smptest", "smptest3", "memory", "setjmp", "tsc", "rmap_chain", "rdpru", "vmexit_cpuid",
            "vmexit_mov_from_cr8", "vmexit_mov_to_cr8", "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt",
            "vmexit_ple_round_robin", "vmexit_tscdeadline_immed", "vmexit_cr0_wp", "vmexit_cr4_pge", "smap", "pku",
            "xsave", "eventinj", "syscall"],
    "kvm": ["smptest", "smptest3", "vmexit_cpuid", "vmexit_mov_from_cr8", "vmexit_mov_to_cr8",
            "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt", "vmexit_ple_round_robin", "vmexit_tscdeadline",
            "vmexit_tscdeadline_immed", "vmexit_cr0_wp", "vmexit_cr4_pge", "realmode", "idt_test", "setjmp",
            "rmap_chain", "la57", "lam"],
}


@pytest.fixture(scope="session")
def suite():
    try:
        tree = build_suite()
    except SuiteUnavailable as err:
        pytest.skip(str(err))
    return tree, {test.name: test for test in read_tests(tree)}


@pytest.mark.parametrize("accel, name", [(accel, name) for accel, names in REGRESSION_SET.items()
                                         for name in names])
def test_passes_on_pyvmm(suite, accel, name, tmp_path):
    if accel == "kvm" and (reason := kvm_usable()):
        pytest.skip(reason)
    tree, tests = suite
    outcome = run_test(tree, tests[name], accel, tmp_path, timeout_scale=2.0, vmms=("pyvmm",))["pyvmm"]
    if outcome.result == PASS:
        return
    log = read_log(tmp_path / f"{name}.pyvmm.log")
    assert accel == "kvm", f"{outcome.result}: {outcome.detail}\n{log[-3000:]}"
    peer = run_test(tree, tests[name], accel, tmp_path, timeout_scale=2.0, vmms=("qemu",))["qemu"]
    assert peer.result in (FAIL, TIMEOUT) and peer.result == outcome.result, (
        f"{outcome.result} on pyvmm, {peer.result} on QEMU -enable-kvm on this host's KVM: "
        f"{outcome.detail}\n{log[-3000:]}")
    # The same report, line for line, up to where each stopped: not just the same failures.
    reported = report_lines(log)
    assert reported and reported == report_lines(read_log(tmp_path / f"{name}.qemu.log")), (
        f"pyvmm's report is not QEMU's on this host's KVM:\n{log[-3000:]}")


def read_log(path) -> str:
    return path.read_text() if path.exists() else "(no log: the test did not run)"


def report_lines(log: str) -> list[str]:
    """What the test reported: its PASS/FAIL/SKIP/XPASS/XFAIL lines and its SUMMARY."""
    return [line for line in log.splitlines() if line.startswith(REPORTS)]


REPORTS = ("PASS: ", "FAIL: ", "SKIP: ", "XPASS: ", "XFAIL: ", "SUMMARY: ")
