"""bench/report.py: each figure printed with its peer and ratio, and all of them in one JSON file."""

import json

from bench.report import figure, interleaved, markdown_table, skipped


def test_figures_of_one_run_land_in_one_json_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "bench.json"
    monkeypatch.setenv("PYVMM_BENCH_JSON", str(target))
    figure("pio exit", "us/exit", 12.0, "C loop", 8.0)
    figure("serial output", "lines/s", 500.0, "QEMU", 1000.0, lower_is_better=False)
    figure("memory", "MiB", 50.0, "QEMU", None, missing="apt-get install qemu-system-x86")
    skipped("kvm boot", "no /dev/kvm")
    figure("start", "s", 0.2, "QEMU", 0.1, note="CPU time 0.1 s")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pio exit: pyvmm 12.00 us/exit, C loop 8.00 us/exit, ratio 1.50x (lower is better)"
    assert lines[1].endswith("ratio 0.50x (higher is better)")
    assert lines[2] == "memory: pyvmm 50.00 MiB, peer QEMU missing: apt-get install qemu-system-x86"
    assert lines[3] == "kvm boot: not measured: no /dev/kvm"
    assert lines[4] == "start: pyvmm 0.20 s, QEMU 0.10 s, ratio 2.00x (lower is better) [CPU time 0.1 s]"
    data = json.loads(target.read_text())
    assert [f["name"] for f in data["figures"]] == ["pio exit", "serial output", "memory", "kvm boot", "start"]
    assert data["figures"][0]["ratio"] == 1.5 and data["figures"][2]["ratio"] is None
    assert data["figures"][2]["missing"] == "apt-get install qemu-system-x86"
    assert data["host"]["cpus"] >= 1
    table = markdown_table(data).splitlines()
    assert table[2] == "| pio exit | 12.00 us/exit | C loop 8.00 us/exit | 1.50x (lower is better) |"
    assert table[4] == "| memory | 50.00 MiB | QEMU missing: apt-get install qemu-system-x86 |  |"
    assert table[5] == "| kvm boot | not measured: no /dev/kvm | | |"
    assert table[6] == "| start [CPU time 0.1 s] | 0.20 s | QEMU 0.10 s | 2.00x (lower is better) |"


def test_interleaved_alternates_and_keeps_medians():
    calls = []
    ours = iter([3.0, 1.0, 2.0])
    theirs = iter([10.0, 30.0, 20.0])
    result = interleaved(lambda: calls.append("us") or next(ours),
                         lambda: calls.append("peer") or next(theirs), repeats=3)
    assert result == (2.0, 20.0)
    assert calls == ["us", "peer"] * 3
