"""kvm-unit-tests on a real KVM: `python -m tests.conformance.nested [--timeout-scale S] [TEST...]`.

The side-by-side run of tests.conformance.kut (QEMU -enable-kvm beside
pyvmm --accel kvm), done inside the nested tier's L1 (tests/nested: Linux on
QEMU's software CPU with an emulated SVM, whose kvm-amd is a real KVM), for
hosts whose own KVM is not one (kvm_pvm, PLATFORM.md). The suite is built
here; its .flat files, its test list and QEMU (with the pc machine's
firmware) go into L1; the runner's table comes back with its JSON and logs.
`make kvm-unit-tests-nested` runs it all.

L1 runs its guests at a fraction of this machine's speed, so each test's
timeout is multiplied by the scale; a test that times out on both is no
difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.conformance.suite import TARBALL, build_suite, read_tests
from tests.helpers import REPO
from tests.nested.l1_image import RESULTS, Tree
from tests.nested.l1_run import IN_CHECKOUT, PYTHON, L1Result, run_in_l1

# Where the built suite sits in L1: the runner's cache layout (suite.py), so it is found built.
L1_CACHE = "/opt/pyvmm/kut"
L1_TARBALL = f"{L1_CACHE}/{TARBALL.name}"
# The timeouts times this by default: L1's guests run on a software CPU's emulated SVM. The
# slowest test either VMM passed there took half its own timeout (sieve, pyvmm 94 of 180 s);
# those that ran out at 4 times theirs stopped at the same check on both, as at 2 times.
TIMEOUT_SCALE = 2.0
L1_BOOT_SECONDS = 300
KILL_GRACE = 10  # per run, on top of its timeout (kut.KILL_GRACE and start-up)


def suite_files(tree: Path) -> Tree:
    """The built suite as the runner's cache holds it: the .flat files, the test list, the stamp, the tarball."""
    files = Tree()
    root = f"{L1_CACHE}/{tree.parent.name}"
    for path in [*sorted((tree / "x86").glob("*.flat")), tree / "x86" / "unittests.cfg"]:
        files.file(f"{root}/kvm-unit-tests/x86/{path.name}", path)
    files.file(f"{root}/built", b"")
    files.file(L1_TARBALL, TARBALL)  # the cache is keyed by its hash
    return files


def script(names: list[str], timeout_scale: float, suite_root: str) -> str:
    return f"""{IN_CHECKOUT}
export PYVMM_KUT_CACHE={L1_CACHE} PYVMM_KUT_TARBALL={L1_TARBALL}
{PYTHON} -m tests.conformance.kut --accel kvm --timeout-scale {timeout_scale} \\
    --json {RESULTS}/kvm-unit-tests.json {" ".join(names)}
status=$?
tar -cf {RESULTS}/logs.tar -C {suite_root}/logs kvm
exit $status
"""


def l1_timeout(names: list[str], timeout_scale: float) -> float:
    """A bound for the whole L1 run: its boot, then every test's timeout on both VMMs."""
    tests = [test for test in read_tests(build_suite()) if not names or test.name in names]
    return L1_BOOT_SECONDS + sum(2 * (test.timeout * timeout_scale + KILL_GRACE) for test in tests)


def run_nested(names: list[str], timeout_scale: float, work: Path, echo=None) -> tuple[dict | None, L1Result]:
    """Run the comparison in L1: (the runner's JSON report, or None if it wrote none; the L1 run)."""
    tree = build_suite()
    result = run_in_l1(script(names, timeout_scale, f"{L1_CACHE}/{tree.parent.name}"), REPO,
                       l1_timeout(names, timeout_scale), work, echo=echo, with_qemu=True,
                       more={"kvm-unit-tests": suite_files(tree)})
    report = result.files.get("kvm-unit-tests.json")
    return (json.loads(report) if report else None), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", help="test names (default: all)")
    parser.add_argument("--timeout-scale", type=float, default=TIMEOUT_SCALE,
                        help=f"multiply every test's timeout (default {TIMEOUT_SCALE}: L1 is slow)")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "kvm-unit-tests-l1.json")
    parser.add_argument("--console", action="store_true", help="show L1's console as it runs")
    args = parser.parse_args(argv)
    unknown = set(args.tests) - {test.name for test in read_tests(build_suite())}
    if unknown:
        parser.error(f"no such test: {', '.join(sorted(unknown))}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        report, result = run_nested(args.tests, args.timeout_scale, work,
                                    echo=(lambda line: print(line, flush=True)) if args.console else None)
        logs = args.json.with_suffix(".logs.tar")
        logs.parent.mkdir(parents=True, exist_ok=True)
        logs.write_bytes(result.files.get("logs.tar", b""))
    print("kvm-unit-tests inside L1 (QEMU TCG -cpu max, its kvm-amd), QEMU -enable-kvm beside pyvmm --accel kvm:")
    print(result.files.get("output.txt", b"").decode(errors="replace").rstrip())
    print(f"(whole L1 run {time.monotonic() - started:.0f} s; the runs' logs in {logs})")
    if report is None:
        print("kvm-unit-tests-nested: the runner wrote no results in L1; L1's console ended:\n"
              + "\n".join(result.console.splitlines()[-60:]), file=sys.stderr)
        return 2
    report["where"] = "L1: QEMU TCG -cpu max (emulated SVM), kvm-amd"
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results in {args.json}")
    return 0 if not report["runs"]["kvm"]["behind_qemu"] else 1


if __name__ == "__main__":
    sys.exit(main())
