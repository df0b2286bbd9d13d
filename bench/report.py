"""How every benchmark reports a figure: pyvmm's, its peer's, the ratio, and one JSON file.

A figure is one line on stdout:

    <name>: pyvmm 11.05 us/exit, C loop 7.57 us/exit, ratio 1.46x (lower is better)

or, when the peer cannot be measured here, the peer's name and why
("peer QEMU missing: apt-get install qemu-system-x86"). The ratio is always
pyvmm's figure divided by the peer's, in the figure's own unit, so a time
ratio below 1 and a throughput ratio above 1 both mean pyvmm is ahead.

Every figure is also appended to the JSON file named by PYVMM_BENCH_JSON
(`make bench` sets it to build/bench.json and empties it first), so one
`make bench` run leaves all its figures in one file.

On a shared machine absolute times are noise: `interleaved` measures pyvmm
and its peer alternately, several times, and keeps the medians.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

JSON_ENV = "PYVMM_BENCH_JSON"
REPEATS = int(os.environ.get("PYVMM_BENCH_REPEATS", "5"))


def interleaved(ours: Callable[[], float], theirs: Callable[[], float] | None,
                repeats: int = REPEATS) -> tuple[float, float | None]:
    """Medians of `repeats` alternating measurements of pyvmm and its peer (None: no peer)."""
    our_samples, their_samples = [], []
    for _ in range(repeats):
        our_samples.append(ours())
        if theirs is not None:
            their_samples.append(theirs())
    return statistics.median(our_samples), statistics.median(their_samples) if their_samples else None


def figure(name: str, unit: str, pyvmm: float, peer_name: str, peer: float | None, *,
           lower_is_better: bool = True, missing: str = "", note: str = "") -> dict:
    """Print one figure with its peer and ratio, and record it in the run's JSON file.

    `missing` says why the peer has no figure (pass peer=None with it).
    """
    line = f"{name}: pyvmm {pyvmm:,.2f} {unit}"
    ratio = None
    if peer is not None and peer > 0:
        ratio = pyvmm / peer
        better = "lower" if lower_is_better else "higher"
        line += f", {peer_name} {peer:,.2f} {unit}, ratio {ratio:.2f}x ({better} is better)"
    else:
        line += f", peer {peer_name} missing: {missing or 'no figure'}"
    if note:
        line += f" [{note}]"
    print(line, flush=True)
    record = {"name": name, "unit": unit, "pyvmm": pyvmm, "peer": peer_name, "peer_value": peer,
              "ratio": ratio, "lower_is_better": lower_is_better, "missing": missing or None,
              "note": note or None}
    _append(record)
    return record


def skipped(name: str, reason: str) -> None:
    """A figure that cannot be measured on this host at all: said on stdout and in the JSON."""
    print(f"{name}: not measured: {reason}", flush=True)
    _append({"name": name, "skipped": reason})


def _append(record: dict) -> None:
    path = os.environ.get(JSON_ENV)
    if not path:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.exists() and target.stat().st_size else None
    if data is None:
        data = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": _host(),
                "figures": []}
    data["figures"].append(record)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    temporary.replace(target)


def _host() -> dict:
    """What the figures were measured on: enough to tell two machines apart."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "kvm_module": next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                                if os.path.exists(f"/sys/module/{m}")), None),
            "load_average": os.getloadavg()}


def children_cpu_seconds() -> float:
    """User + system seconds used so far by this process's waited-for children: the difference
    around a run is that run's CPU time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system time of a running process, all its threads (/proc/PID/stat, fields 14-15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_env() -> dict[str, str]:
    """The environment a user's pyvmm runs in: bytecode caches written and used;
    and `python -m vmm` runs the pyvmm of the tree this script is in.

    (Some shells, this project's development sessions among them, export
    PYTHONDONTWRITEBYTECODE, which makes every start compile the sources
    again: a cost no installed pyvmm pays. And `python -m` would otherwise
    import vmm from the current directory, or from wherever the venv's
    editable install points, which need not be this tree.)
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONSAFEPATH"] = "1"  # no current directory at the front of sys.path
    return env


def run_guest(bench: str, command: list[str], parse: Callable[[str], dict[str, float]], *, timeout: float,
              cwd: Path) -> dict[str, float]:
    """Run a VMM whose guest prints its figures on the console; `parse` reads them from its output
    (and asserts they are there). A guest that did not get that far ends the benchmark with one line."""
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=cwd,
                            env=python_env())
    try:
        return parse(result.stdout.decode(errors="replace"))
    except AssertionError as err:
        raise SystemExit(f"{bench}: {command[0]} failed (status {result.returncode}): {err}\n"
                         f"{result.stderr.decode(errors='replace')[-2000:]}") from None


def markdown_table(data: dict) -> str:
    """The figures of one run as the README's table (a figure's note in brackets after its name)."""
    rows = ["| figure | pyvmm | peer | ratio |", "| --- | --- | --- | --- |"]
    for entry in data["figures"]:
        if "skipped" in entry:
            rows.append(f"| {entry['name']} | not measured: {entry['skipped']} | | |")
            continue
        unit = entry["unit"]
        peer = (f"{entry['peer']} {entry['peer_value']:,.2f} {unit}" if entry["peer_value"] is not None
                else f"{entry['peer']} missing: {entry['missing']}")
        ratio = (f"{entry['ratio']:.2f}x ({'lower' if entry['lower_is_better'] else 'higher'} is better)"
                 if entry["ratio"] is not None else "")
        name = f"{entry['name']} [{entry['note']}]" if entry.get("note") else entry["name"]
        rows.append(f"| {name} | {entry['pyvmm']:,.2f} {unit} | {peer} | {ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
