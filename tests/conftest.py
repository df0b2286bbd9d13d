"""Suite-wide test policy.

With PYVMM_NO_SKIP=1 (set by .ci/run) a skipped test fails instead: CI
installs everything the suite needs, so a skip there means a broken setup.

One kind of skip stays a skip: a reason starting with HOST_LIMITATION names
something the host's accelerator cannot do at all (kvm_pvm cannot emulate
SYSRET or `int n` in ring 0, PLATFORM.md). No install step can fix that;
the same test runs on the software CPU, and on KVM wherever KVM can run it.
"""

import os

import pytest

HOST_LIMITATION = "host limitation:"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("PYVMM_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail")
            and HOST_LIMITATION not in str(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (PYVMM_NO_SKIP=1): {report.longrepr}"
