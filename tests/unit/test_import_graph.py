"""The import graph stays one-way: cli -> machine -> accelerators/devices/boot -> memory/bus.

Reads every module's imports with `ast` (no project code runs) and checks
the rules CONTRIBUTING.md states: no cycles, nothing below the devices
imports one, nothing below the machine imports it, and the KVM host quirks
stay inside vmm/kvm.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("vmm", "devices", "boot")
# The machine layer: what builds and runs a machine (vmm/run/runner.py runs one for `pyvmm run`).
MACHINE = {"vmm.__main__", "vmm.cli", "vmm.session", "vmm.builder", "vmm.machine", "vmm.stats", "vmm.virtio_setup",
           "vmm.accel_select", "vmm.host_check", "vmm.run.runner"}
# Below the devices: what devices, loaders and accelerators stand on.
FOUNDATION = {"vmm.bus", "vmm.memory", "vmm.layout", "vmm.errors", "vmm.exit_status", "vmm.exits",
              "vmm.cpu_state", "vmm.cpu_features", "vmm.host_memory"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from package import module` counts as the module)."""
    modules = {module_name(f): f for package in PACKAGES for f in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                if candidate in modules and candidate != name and modules[candidate].name != "__init__.py":
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


GRAPH = project_imports()


def test_there_are_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [module, target]))
            elif target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_the_foundation_imports_nothing_above_it():
    upward = {(m, t) for m in FOUNDATION for t in GRAPH.get(m, ()) if t not in FOUNDATION}
    assert upward == set()


def test_nothing_below_the_machine_imports_it():
    below = [m for m in GRAPH if m not in MACHINE]
    assert {(m, t) for m in below for t in GRAPH[m] if t in MACHINE} == set()


def test_only_the_kvm_package_knows_its_host_quirks():
    assert {m for m, targets in GRAPH.items() if "vmm.kvm.quirks" in targets
            and not m.startswith("vmm.kvm.")} == set()


def test_the_graph_sees_imports():
    # A parser that found nothing would pass every test above.
    assert "vmm.bus" in GRAPH["devices.uart"] and "vmm.kvm.vcpu" in GRAPH["vmm.kvm.accel"]
