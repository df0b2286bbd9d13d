"""kvm-unit-tests (x86): built from the shared tarball, its test list read, each test turned into command lines.

The suite is GPL-2.0 third-party material (../shared/third_party/README.md):
it is unpacked and built in a cache keyed by the tarball's hash,
~/.cache/pyvmm-kut/<hash>/, never inside the checkout. `x86/unittests.cfg`
lists the tests; `x86/run` and `scripts/runtime.bash` show how the suite
starts QEMU and reads its result, which `qemu_command`, `pyvmm_command` and
`Outcome.from_run` follow:

- QEMU: `-kernel NAME.flat -smp N -append ARGS -initrd ENV` with pc-testdev and
  isa-debug-exit; a guest's `exit(code)` makes QEMU exit `(code << 1) | 1`.
- pyvmm: `boot --kernel NAME.flat --cpus N --cmdline ARGS --initrd ENV`; its
  debug-exit port exits with `code` itself.
- `code` is 0 when every check passed, 1 when one failed, 38 (77 >> 1) when
  every check skipped.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARBALL_NAME = "kvm-unit-tests-1da1819e.tar.gz"


def _find_tarball() -> Path:
    """$PYVMM_KUT_TARBALL, else ../shared/third_party/ beside the checkout (or beside a worktree's parent)."""
    if "PYVMM_KUT_TARBALL" in os.environ:
        return Path(os.environ["PYVMM_KUT_TARBALL"])
    candidates = [base / "shared" / "third_party" / TARBALL_NAME for base in (REPO.parent, REPO.parent.parent)]
    return next((path for path in candidates if path.is_file()), candidates[0])


TARBALL = _find_tarball()
CACHE = Path(os.environ.get("PYVMM_KUT_CACHE", Path.home() / ".cache" / "pyvmm-kut"))
DEFAULT_TIMEOUT = 90.0  # scripts/runtime.bash, when the test names none
DEFAULT_MEMORY_MIB = 128  # QEMU's default -m; pyvmm is given the same
BUILD_TIMEOUT = 1800

# QEMU's CPU feature names where /proc/cpuinfo's (pyvmm's) differ.
QEMU_FEATURE_NAMES = {"tsc-deadline": "tsc_deadline_timer"}
# CPU properties that are not CPUID features and change nothing pyvmm would
# do differently (pyvmm always passes the host's physical address width).
IGNORED_CPU_PROPERTIES = {"host-phys-bits", "migratable=no"}
# QEMU options that change nothing the test checks: vmexit_ipi turns the PIT
# off only so that KVM may use (x2)AVIC; pyvmm's PIT stays and is not used.
IGNORED_QEMU_OPTIONS = {("-machine", "pit=off")}
# Tests that need a part of the PC that pyvmm's machine leaves out on purpose,
# by name, with what they need (the "decide per device").
NOT_ON_PYVMMS_MACHINE = {
    "s3": "suspends to RAM (ACPI S3: a FACS with the waking vector, PM1 event and control registers, an RTC "
          "alarm to wake, firmware that resumes); pyvmm's ACPI is hardware-reduced and offers only S5, poweroff",
}


# The software CPU's vendors (`--cpu-vendor`, vmm/tcg/engine.py) by CPUID vendor string.
TCG_CPU_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def host_cpu_vendor() -> str:
    """The CPUID vendor of the host, which a KVM guest sees."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


class SuiteUnavailable(Exception):
    """The tarball is missing or does not build; the message says what to do."""


def tarball_hash(path: Path = TARBALL) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_suite(path: Path = TARBALL) -> Path:
    """The built source tree (x86/*.flat made), from the cache or built now."""
    if not path.is_file():
        raise SuiteUnavailable(f"{path} is missing (set PYVMM_KUT_TARBALL to the kvm-unit-tests tarball)")
    root = CACHE / tarball_hash(path)
    tree = root / "kvm-unit-tests"
    stamp = root / "built"
    if stamp.exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    steps = [["tar", "xzf", str(path), "-C", str(root)],
             ["./configure", "--arch=x86_64"],
             ["make", f"-j{os.cpu_count() or 1}"]]
    for step in steps:
        done = subprocess.run(step, cwd=root if step[0] == "tar" else tree, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT)
        if done.returncode:
            raise SuiteUnavailable(f"building kvm-unit-tests failed at {' '.join(step)}:\n{done.stderr[-2000:]}")
    stamp.write_text("")
    return tree


@dataclass
class KutTest:
    """One entry of x86/unittests.cfg."""

    name: str
    file: str
    smp: int = 1
    test_args: str = ""
    qemu_params: str = ""
    arch: str = ""
    accel: str = ""
    timeout: float = DEFAULT_TIMEOUT
    groups: list[str] = field(default_factory=list)
    check: list[str] = field(default_factory=list)

    def skip_reason(self, accel: str) -> str | None:
        """Why the suite itself would not run this test here (as run_tests.sh decides), or None."""
        if "nodefault" in self.groups:
            return "marked manual-run only (group nodefault)"
        if self.arch and self.arch != "x86_64":
            return f"{self.arch} only"
        if self.accel and self.accel != accel:
            return f"{self.accel} only"
        if "-enable-kvm" in self.qemu_args() and accel != "kvm":
            return "kvm only (-enable-kvm)"
        for condition in self.check:
            path, _, value = condition.partition("=")
            try:
                actual = Path(path).read_text().strip()
            except OSError:
                actual = None
            if actual != value:
                return f"{path} is not {value}"
        return None

    def qemu_args(self) -> list[str]:
        return shlex.split(self.qemu_params)

    def memory_mib(self) -> int:
        args = self.qemu_args()
        for option, value in zip(args, args[1:], strict=False):
            if option == "-m":
                return int(value[:-1]) * 1024 if value.lower().endswith("g") else int(value.rstrip("mM"))
        return DEFAULT_MEMORY_MIB

    def pyvmm_options(self, accel: str) -> tuple[list[str], str | None]:
        """pyvmm's options for the test's QEMU parameters, or (…, why pyvmm cannot run it)."""
        from vmm.cpu_features import FEATURES

        options: list[str] = []
        if self.name in NOT_ON_PYVMMS_MACHINE:
            return options, NOT_ON_PYVMMS_MACHINE[self.name]
        args = [arg for arg in self.qemu_args() if arg != "-enable-kvm"]  # skip_reason() saw to it
        index = 0
        while index < len(args):
            option, value = args[index], args[index + 1] if index + 1 < len(args) else ""
            index += 2
            if option == "-m" or (option, value) in IGNORED_QEMU_OPTIONS:
                continue  # -m: memory_mib()
            if option in ("-M", "-machine") and value.split(",")[0] == "q35":
                devices = " ".join(device.split(",")[0] for flag, device in zip(args, args[1:], strict=False)
                                   if flag == "-device")
                return options, f"needs QEMU's q35 machine (PCI Express, IOMMU) with -device {devices}"
            if option != "-cpu":
                return options, f"needs QEMU option {option} {value}"
            edits = []
            for prop in value.split(",")[1:]:
                if prop in IGNORED_CPU_PROPERTIES:
                    continue
                if prop.startswith("vendor="):
                    vendor = prop.partition("=")[2]
                    if accel == "tcg" and vendor in TCG_CPU_VENDORS:
                        options += ["--cpu-vendor", TCG_CPU_VENDORS[vendor]]
                    elif accel == "tcg" or vendor != host_cpu_vendor():
                        return options, f"needs CPU {prop} (pyvmm's guest on {accel} cannot have it)"
                    continue
                if prop.startswith("hv_"):
                    return options, (f"needs Hyper-V enlightenments ({prop}); pyvmm offers a guest KVM's own "
                                     "paravirtual interface only")
                if prop[:1] not in "+-":
                    return options, f"needs CPU property {prop}"
                name = QEMU_FEATURE_NAMES.get(prop[1:], prop[1:].replace("-", "_"))
                if name not in FEATURES:
                    return options, f"pyvmm has no CPU feature {prop[1:]}"
                edits.append(prop[0] + name)
            if edits:
                options += ["--cpu-features", ",".join(edits)]
        return options, None


def expand_backticks(text: str) -> str:
    """unittests.cfg values may hold `command` substitutions (kvmclock_test's `date +%s`)."""
    return re.sub(r"`([^`]*)`", lambda m: subprocess.run(["sh", "-c", m.group(1)], capture_output=True,
                                                          text=True, timeout=10).stdout.strip(), text)


def read_tests(tree: Path) -> list[KutTest]:
    tests: list[KutTest] = []
    for raw in (tree / "x86" / "unittests.cfg").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            tests.append(KutTest(name=line[1:-1], file=""))
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        value = value.strip("'\"") if key in ("test_args",) else value
        test = tests[-1]
        if key == "file":
            test.file = value
        elif key == "smp":
            test.smp = int(value)
        elif key == "test_args":
            test.test_args = expand_backticks(value)
        elif key in ("qemu_params", "extra_params"):
            test.qemu_params = value
        elif key in ("arch", "accel"):
            setattr(test, key, value)
        elif key == "timeout":
            test.timeout = float(value.rstrip("s"))
        elif key == "groups":
            test.groups = value.split()
        elif key == "check":
            test.check = value.split()
    return tests


def environment_file(test: KutTest, accel: str, directory: Path) -> Path:
    """The environment the suite's runner passes as -initrd: CPU count and memory, as read by lib/x86/fwcfg.c."""
    lines = [f"NR_CPUS={test.smp}", f"MEMSIZE={test.memory_mib()}"]
    if accel == "tcg":
        lines.append("ERRATA_FORCE=y")  # scripts/arch-run.bash does this for ACCEL=tcg
    path = directory / f"{test.name}.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def qemu_command(tree: Path, test: KutTest, accel: str, env: Path) -> list[str]:
    return ["qemu-system-x86_64", "--no-reboot", "-nodefaults", "-device", "pc-testdev",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
            "-device", "pci-testdev", "-machine", f"accel={accel}", "-kernel", str(tree / "x86" / test.file),
            "-smp", str(test.smp), *test.qemu_args(), "-initrd", str(env),
            *(["-append", test.test_args] if test.test_args else [])]


def pyvmm_command(tree: Path, test: KutTest, accel: str, env: Path, python: str) -> list[str]:
    options, _ = test.pyvmm_options(accel)
    return [python, "-m", "vmm", "boot", "--accel", accel, "--test-devices", "--kernel", str(tree / "x86" / test.file),
            "--cpus", str(test.smp), "--memory", f"{test.memory_mib()}M", *options, "--initrd", str(env),
            *(["--cmdline", test.test_args] if test.test_args else [])]


PASS, FAIL, SKIP, TIMEOUT, NOT_APPLICABLE = "PASS", "FAIL", "SKIP", "TIMEOUT", "N/A"


@dataclass
class Outcome:
    result: str
    detail: str = ""
    status: int | None = None
    seconds: float = 0.0

    @classmethod
    def from_run(cls, vmm: str, status: int | None, stdout: str, stderr: str, seconds: float) -> Outcome:
        """Read one run as scripts/runtime.bash does: the guest's exit code, through the VMM's encoding."""
        summary = next((line.strip() for line in stdout.splitlines() if line.startswith("SUMMARY:")), "")
        if status is None:
            return cls(TIMEOUT, summary, None, seconds)
        if vmm == "qemu":
            if status == 1 and not _only_warnings(stderr):
                # QEMU's own failure (an option this QEMU or host cannot do): the
                # suite's runner reports such a test as skipped.
                return cls(SKIP, "QEMU refused: " + _last_line(stderr), status, seconds)
            code = status >> 1 if status & 1 else None  # even: the guest never wrote its status
        else:
            code = status
        if code == 0:
            return cls(PASS, summary, status, seconds)
        if code == 77 >> 1:
            return cls(SKIP, summary, status, seconds)
        return cls(FAIL, summary or _last_line(stderr) or f"exit status {status}", status, seconds)


def _only_warnings(stderr: str) -> bool:
    return all("warning" in line.lower() for line in stderr.splitlines() if line.strip())


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""
