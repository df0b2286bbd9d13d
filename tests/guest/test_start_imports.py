"""What a boot imports: the modules of the machine it builds, not those of features it was not asked for.

Each import costs start-up time (issue #18), twentyfold in the nested tier's
L1; the optional features' modules are imported where the feature is chosen.
Python reports every import it makes on stderr under PYTHONPROFILEIMPORTTIME.
"""

from __future__ import annotations

from tests.helpers import run_pyvmm

# Modules only --gdb, a disk, --fs, a multiboot kernel or a guest setting the clock need.
OPTIONAL = {
    "boot.multiboot", "boot.bios_state",
    "vmm.gdb.server", "vmm.gdb.session", "vmm.gdb.debugger", "vmm.gdb.packets", "vmm.gdb.registers",
    "vmm.image.base", "vmm.image.open", "vmm.image.qcow2", "vmm.image.raw",
    "vmm.virtio_setup", "vmm.fuse", "calendar",
}


def imported_modules(stderr: bytes) -> set[str]:
    return {line.rpartition("|")[2].strip() for line in stderr.decode(errors="replace").splitlines()
            if line.startswith("import time:")}


def test_a_linux_boot_imports_no_optional_feature(test_kernel, accel):
    result = run_pyvmm("boot", "--kernel", str(test_kernel), "--accel", accel, "--memory", "256M",
                       env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    modules = imported_modules(result.stderr)
    assert {"boot.linux", "boot.multiboot_header"} <= modules  # the report holds pyvmm's imports
    assert sorted(modules & OPTIONAL) == []
