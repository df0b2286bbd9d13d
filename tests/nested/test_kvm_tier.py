"""The project's KVM tests, run inside an L1 Linux whose /dev/kvm is real, one host test per inner test.

PYVMM_KVM_TIER picks what runs: `full` is every test marked `kvm` (the KVM
variant of each test) in the files below; `ci` is the subset `.ci/run` can
afford: one and two vCPUs, a disk, panic and poweroff. Both run first the
check that L1 holds KVM's static keys (test_inside_l1.py). Each host test passes
or fails as its inner test did, with the inner failure (which carries the L2
console) as its message. L1's whole console is kept in a file named in every
failure.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.helpers import REPO
from tests.nested.l1_image import RESULTS
from tests.nested.l1_run import IN_CHECKOUT, PYTHON, run_in_l1

FULL = ("tests/boot", "tests/guest/test_flat_guests.py", "tests/guest/test_kvm_entry.py")
INSIDE_L1 = ("tests/nested/test_inside_l1.py::test_vms_and_vcpus_coming_and_going_leave_the_kernel_text_alone",)
CI_SUBSET = (
    *INSIDE_L1,
    "tests/boot/test_linux_boot.py::test_boots_to_a_shell_and_powers_off[kvm-1]",
    "tests/boot/test_linux_boot.py::test_boots_to_a_shell_and_powers_off[kvm-2]",
    "tests/boot/test_linux_boot.py::test_the_guest_ending_itself_gives_its_exit_status[kvm-panic]",
    "tests/boot/test_virtio_boot.py::test_disks_rng_and_a_shell_on_hvc0[kvm]",
)
# Wall-clock bound for the whole L1 run: boot, then generously per test.
L1_BOOT_SECONDS = 300
SECONDS_PER_TEST = 300
MONITOR_SECONDS = 180


def inner_tests(tier: str) -> list[str]:
    if tier == "ci":
        return list(CI_SUBSET)
    if tier != "full":
        raise pytest.UsageError(f"PYVMM_KVM_TIER must be ci or full, not {tier!r}")
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                "-m", "kvm", *FULL], cwd=REPO, capture_output=True, text=True, timeout=300)
    tests = [line for line in collected.stdout.splitlines() if "::" in line]
    if collected.returncode != 0 or not tests:
        raise pytest.UsageError(f"collecting the KVM tests failed:\n{collected.stdout}{collected.stderr}")
    return [*INSIDE_L1, *tests]


INNER = inner_tests(os.environ.get("PYVMM_KVM_TIER", "ci"))


def inner_script(tests: list[str]) -> str:
    # The monitor writes to the console directly: on the script's stdout it would
    # keep the pipe to L1's `tee` open after pytest ends.
    return f"""{IN_CHECKOUT}
export PYVMM_NO_SKIP=1
{PYTHON} -m vmm check
# What L1 is busy with, now and then: a test that hangs shows its processes here.
(while sleep {MONITOR_SECONDS}; do top -b -n1 | head -12; done) \\
    >/dev/console 2>&1 &
monitor=$!
{PYTHON} -m pytest -p no:cacheprovider -v -rfE --durations=0 --junitxml={RESULTS}/junit.xml \\
    {" ".join(shlex.quote(test) for test in tests)}
status=$?
kill $monitor
exit $status
"""


def outcomes(junit: bytes) -> dict[str, tuple[str, str]]:
    """Node ID -> (passed/failed/skipped, detail) from pytest's JUnit XML."""
    found = {}
    for case in ET.fromstring(junit).iter("testcase"):
        node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                detail = f"{child.get('message', '')}\n{child.text or ''}"
                break
        found[node] = (outcome, detail)
    return found


@pytest.fixture(scope="module")
def l1_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("l1")
    result = run_in_l1(inner_script(INNER), REPO, L1_BOOT_SECONDS + SECONDS_PER_TEST * len(INNER), work,
                       echo=lambda line: print(line, flush=True))
    console_log = work / "l1-console.log"
    console_log.write_text(result.console)
    return result, outcomes(result.files.get("junit.xml", b"<testsuites/>")), console_log


@pytest.mark.parametrize("inner", INNER)
def test_on_a_real_kvm(l1_run, inner):
    result, cases, console_log = l1_run
    if inner not in cases:
        tail = "\n".join(result.console.splitlines()[-60:])
        pytest.fail(f"{inner} did not run in L1 (pytest status {result.status}; L1 console in {console_log}):\n"
                    f"{tail}", pytrace=False)
    outcome, detail = cases[inner]
    if outcome != "passed":
        pytest.fail(f"{outcome} inside L1 (L1 console in {console_log}):\n{detail}", pytrace=False)
