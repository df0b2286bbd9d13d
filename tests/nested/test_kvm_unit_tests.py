"""kvm-unit-tests on a real KVM (the full tier only): inside L1, pyvmm passes every test QEMU -enable-kvm passes.

One L1 run of the whole comparison (tests/conformance/nested.py, what `make
kvm-unit-tests-nested` prints), about half an hour; the runner's table is in the failure.
"""

from __future__ import annotations

from tests.conformance.nested import TIMEOUT_SCALE, run_nested
from tests.conformance.suite import PASS


def test_pyvmm_passes_every_test_qemu_passes_in_l1(tmp_path):
    report, result = run_nested([], TIMEOUT_SCALE, tmp_path, echo=lambda line: print(line, flush=True))
    table = result.files.get("output.txt", b"").decode(errors="replace")
    assert report is not None, "the runner wrote no results in L1; L1's console ended:\n" + \
        "\n".join(result.console.splitlines()[-60:])
    run = report["runs"]["kvm"]
    passed_by_qemu = [r["name"] for r in run["results"] if r["qemu"]["result"] == PASS]
    assert passed_by_qemu, f"QEMU -enable-kvm passed no test in L1, so nothing was compared:\n{table}"
    # Tests needing what pyvmm's machine does not have are N/A, each with its reason, in the table.
    assert not run["behind_qemu"], f"QEMU passes, pyvmm does not: {' '.join(run['behind_qemu'])}\n{table}"
