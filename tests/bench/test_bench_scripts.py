"""Every benchmark `make bench` runs, end to end at the smallest sizes its docstring allows.

Nothing here is timed: at these sizes the figures mean nothing. What is
checked is that each script still runs, as `make bench` runs it, and prints
what bench/report.py promises: every figure as one line with pyvmm's figure
beside the peer's and the ratio, or beside the named missing peer. `make
bench` once stopped at a TypeError in bench_firmware.py that no test ran
into. With PYVMM_NO_SKIP=1 (CI, which installs QEMU and the test kernel)
every peer must have been there and every figure measured, except where
the host's own KVM cannot boot Linux. bench/nested_kvm.py (`make bench-kvm`)
needs the nested tier's L1 and is not run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow

SCRIPTS = sorted(path.name for path in (REPO / "bench").glob("bench_*.py"))
# The smallest sizes and repeat counts the scripts' environment variables take.
SMALL = {
    "PYVMM_BENCH_REPEATS": "1",
    "PYVMM_BENCH_BOOT_REPEATS": "1",
    "PYVMM_BENCH_BLK_MB": "4",
    "PYVMM_BENCH_BLK_IOPS_COUNT": "100",
    "PYVMM_BENCH_BLK_REPEATS": "1",
    "PYVMM_BENCH_CONSOLE_LINES": "200",
    "PYVMM_BENCH_CONSOLE_REPEATS": "1",
    "PYVMM_BENCH_IMG_MB": "16",
    "PYVMM_BENCH_IMG_READS": "200",
    "PYVMM_BENCH_RUN_MB": "4",
    "PYVMM_BENCH_STRESS_SECONDS": "2",
    "PYVMM_BENCH_STRESS_CPUS": "1,2",
    "PYVMM_BENCH_STRESS_REPEATS": "1",
    "PYVMM_BENCH_STRESS_FIXED_HASHES": "5",
    "PYVMM_BENCH_STRESS_FIXED_DISK_LOOPS": "2",
}
# What a figure may go unmeasured for even in CI: this host's KVM cannot boot Linux (PLATFORM.md).
HOST_LIMITS = ("KVM cannot boot Linux",)
NUMBER = r"-?[\d,]+\.\d\d"


def figure_line(record: dict) -> str:
    """The pattern of the line bench/report.py prints for one figure."""
    name, unit, peer = (re.escape(record[key]) for key in ("name", "unit", "peer"))
    beside = (rf"{peer} {NUMBER} {unit}, ratio \d+\.\d\dx \((lower|higher) is better\)"
              if record["ratio"] is not None else rf"peer {peer} missing: .+")
    return rf"^{name}: pyvmm {NUMBER} {unit}, {beside}$"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_runs_small_and_prints_its_figures(script, linux_assets, linux_module_tree, tmp_path):
    results = tmp_path / "bench.json"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYVMM_BENCH_")}
    env.update(SMALL, PYVMM_BENCH_JSON=str(results))
    done = subprocess.run([sys.executable, f"bench/{script}"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = json.loads(results.read_text())["figures"] if results.exists() else []
    assert records, f"{script} printed no figure:\n{done.stdout[-2000:]}"
    lines = done.stdout.splitlines()
    in_ci = os.environ.get("PYVMM_NO_SKIP") == "1"
    for record in records:
        if "skipped" in record:
            assert f"{record['name']}: not measured: {record['skipped']}" in lines
            assert not in_ci or any(limit in record["skipped"] for limit in HOST_LIMITS), record
            continue
        pattern = figure_line(record)
        assert any(re.match(pattern, line.split(" [")[0]) for line in lines), (pattern, done.stdout[-2000:])
        assert not in_ci or not record["missing"], f"the peer is missing in CI: {record}"
