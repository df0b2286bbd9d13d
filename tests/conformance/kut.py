"""kvm-unit-tests on pyvmm beside QEMU: `python -m tests.conformance.kut [--accel tcg|kvm|both] [TEST...]`.

For each accelerator and each test of x86/unittests.cfg that the suite's own
runner would run there, boot it on QEMU (`-accel tcg`, or `-enable-kvm`) and on
pyvmm (`--accel tcg|kvm`), one after the other, each bounded by the test's
timeout (times --timeout-scale); print both results on one line, then a summary
and the differences; write everything to a JSON file. Logs of every run go to
the cache beside the built suite. `make kvm-unit-tests` runs it all.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tests.conformance.suite import (
    NOT_APPLICABLE,
    PASS,
    SKIP,
    KutTest,
    Outcome,
    build_suite,
    environment_file,
    pyvmm_command,
    qemu_command,
    read_tests,
)
from tests.helpers import REPO, die_with_test_runner

KILL_GRACE = 5.0  # after SIGTERM, before SIGKILL


def run_bounded(command: list[str], timeout: float, log: Path) -> tuple[int | None, str, str, float]:
    """Run `command` in its own process group; on timeout stop the whole group. (status|None, out, err, s)."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, start_new_session=True, preexec_fn=die_with_test_runner, text=True, errors="replace")
    try:
        out, err = process.communicate(timeout=timeout)
        status = process.returncode
    except BaseException as stopped:  # interrupted (Ctrl-C, SIGTERM): leave no VMM running
        if not isinstance(stopped, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            raise
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        status = None
    seconds = time.monotonic() - started
    log.write_text(f"$ {' '.join(command)}\n# status {status}, {seconds:.1f} s\n--- stdout\n{out}\n--- stderr\n{err}")
    return status, out, err, seconds


def run_test(tree: Path, test: KutTest, accel: str, logs: Path, timeout_scale: float,
             vmms: tuple[str, ...] = ("qemu", "pyvmm")) -> dict[str, Outcome]:
    skip = test.skip_reason(accel)
    if skip:
        return {vmm: Outcome(SKIP, skip) for vmm in vmms}
    env = environment_file(test, accel, logs)
    outcomes = {}
    for vmm in vmms:
        if vmm == "qemu":
            command = qemu_command(tree, test, accel, env)
        else:
            _, why_not = test.pyvmm_options(accel)
            if why_not:
                outcomes[vmm] = Outcome(NOT_APPLICABLE, why_not)
                continue
            command = pyvmm_command(tree, test, accel, env, sys.executable)
        status, out, err, seconds = run_bounded(command, test.timeout * timeout_scale,
                                                logs / f"{test.name}.{vmm}.log")
        outcomes[vmm] = Outcome.from_run(vmm, status, out, err, seconds)
    return outcomes


def differences(results: list[dict]) -> list[dict]:
    """Tests whose pyvmm result is not QEMU's, where one of them passed (and pyvmm could run it)."""
    return [r for r in results if (r["qemu"]["result"] == PASS) != (r["pyvmm"]["result"] == PASS)
            and r["pyvmm"]["result"] != NOT_APPLICABLE]


def not_applicable_but_passed_by_qemu(results: list[dict]) -> list[dict]:
    """Tests QEMU passes that need what pyvmm's machine does not have (a QEMU-only machine or device)."""
    return [r for r in results if r["qemu"]["result"] == PASS and r["pyvmm"]["result"] == NOT_APPLICABLE]


def summary_line(results: list[dict], vmm: str) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r[vmm]["result"]] = counts.get(r[vmm]["result"], 0) + 1
    return ", ".join(f"{n} {result}" for result, n in sorted(counts.items()))


def cell(outcome: Outcome) -> str:
    text = f"{outcome.result:<7} {outcome.seconds:5.1f}s" if outcome.seconds else f"{outcome.result:<7}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", help="test names (default: all)")
    parser.add_argument("--accel", choices=("tcg", "kvm", "both"), default="both")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "kvm-unit-tests.json")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every test's timeout (a loaded machine needs more)")
    parser.add_argument("--pyvmm-only", action="store_true", help="do not run QEMU")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so run_bounded cleans up

    tree = build_suite()
    tests = read_tests(tree)
    if args.tests:
        unknown = set(args.tests) - {t.name for t in tests}
        if unknown:
            parser.error(f"no such test: {', '.join(sorted(unknown))}")
        tests = [t for t in tests if t.name in args.tests]
    accels = ["tcg", "kvm"] if args.accel == "both" else [args.accel]
    vmms = ("pyvmm",) if args.pyvmm_only else ("qemu", "pyvmm")
    report: dict = {"suite": tree.parent.name, "runs": {}}
    for accel in accels:
        logs = tree.parent / "logs" / accel
        logs.mkdir(parents=True, exist_ok=True)
        peer = "QEMU TCG" if accel == "tcg" else "QEMU -enable-kvm"
        print(f"== kvm-unit-tests, accelerator {accel}: {peer} beside pyvmm (logs in {logs})", flush=True)
        print(f"{'test':<36} {'qemu':<16} {'pyvmm':<16} detail (pyvmm, else QEMU)", flush=True)
        results = []
        for test in tests:
            outcomes = run_test(tree, test, accel, logs, args.timeout_scale, vmms)
            outcomes.setdefault("qemu", Outcome(SKIP, "not run (--pyvmm-only)"))
            detail = outcomes["pyvmm"].detail or (outcomes["qemu"].detail if "qemu" in vmms else "")
            print(f"{test.name:<36} {cell(outcomes['qemu']):<16} {cell(outcomes['pyvmm']):<16} {detail}",
                  flush=True)
            results.append({"name": test.name, **{vmm: asdict(o) for vmm, o in outcomes.items()}})
        diffs = differences(results)
        print(f"-- summary ({accel}): QEMU {summary_line(results, 'qemu')}; pyvmm {summary_line(results, 'pyvmm')}")
        behind = [d["name"] for d in diffs if d["qemu"]["result"] == PASS]
        ahead = [d["name"] for d in diffs if d["pyvmm"]["result"] == PASS]
        print(f"-- QEMU passes, pyvmm does not ({len(behind)}): {' '.join(behind) or '-'}")
        print(f"-- pyvmm passes, QEMU does not ({len(ahead)}): {' '.join(ahead) or '-'}", flush=True)
        qemu_only = not_applicable_but_passed_by_qemu(results)
        listed = "; ".join(f"{r['name']} ({r['pyvmm']['detail']})" for r in qemu_only)
        print(f"-- QEMU passes, not applicable to pyvmm ({len(qemu_only)}): {listed or '-'}", flush=True)
        report["runs"][accel] = {"results": results, "behind_qemu": behind, "ahead_of_qemu": ahead,
                                 "qemu_only": [r["name"] for r in qemu_only]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results in {args.json}")
    return 0 if all(not run["behind_qemu"] for run in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
