"""The QEMU that runs L1: Debian's bookworm-backports QEMU 10, unpacked into the asset cache.

Debian 12's own QEMU 7.2 stays the peer everywhere else (the benchmarks, the
kvm-unit-tests comparison, qemu-img), but it is not L1's CPU any more. Its
software CPU, emulating SVM for L1, now and then stopped giving L1 its timer
interrupts once L1's KVM ran an L2: both L1 vCPUs halted with interrupts on and
L1 printed nothing for half an hour, not even the line it prints every three
minutes (the run that failed CI on 2026-12-05); with one L1 vCPU, L1 never got
control back from an L2 spinning on an IPI. That, and one L1 stuck on a
runqueue lock nobody held, failed about one CI-subset run in four.
Under QEMU 10.0 every run passed (see docs/testing.md, "Linux on a real KVM").

apt fetches the two packages with a state of its own in the cache (a sources
list naming only bookworm-backports), so the machine's apt configuration is
left as it is; the binary runs on Debian 12's libraries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.assets import apt_download, assets_dir, run_tool

SOURCES = ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
           "http://deb.debian.org/debian bookworm-backports main\n")
SUITE = "bookworm-backports"
# The emulator, and its firmware (microvm's qboot) for -L.
PACKAGES = ("qemu-system-x86", "qemu-system-data")


@dataclass(frozen=True)
class L1Qemu:
    root: Path  # the packages unpacked

    @property
    def command(self) -> list[str]:
        """The start of a command line: the binary, told where its own firmware is."""
        return [str(self.root / "usr/bin/qemu-system-x86_64"), "-L", str(self.root / "usr/share/qemu")]

    def version(self) -> str:
        return subprocess.run([*self.command, "--version"], capture_output=True, text=True,
                              check=True, timeout=60).stdout.splitlines()[0]


def l1_qemu(cache: Path | None = None) -> L1Qemu:
    """QEMU for L1, downloaded and unpacked the first time."""
    directory = (cache or assets_dir()) / "l1-qemu"
    qemu = L1Qemu(directory / "root")
    if (qemu.root / "usr/bin/qemu-system-x86_64").exists():
        return qemu
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        scratch = Path(scratch)
        apt = private_apt(scratch / "apt")
        run_tool(["apt-get", *apt, "update"])
        for package in PACKAGES:
            deb = apt_download(f"{package}/{SUITE}", scratch, apt)
            run_tool(["dpkg-deb", "-x", str(deb), str(scratch / "root")])
        L1Qemu(scratch / "root").version()  # it runs on this machine's libraries
        try:
            (scratch / "root").rename(qemu.root)
        except OSError:  # another run unpacked it meanwhile: keep theirs
            shutil.rmtree(scratch / "root")
    return qemu


def private_apt(state: Path) -> tuple[str, ...]:
    """apt-get options for an apt whose sources, lists and cache live under `state`."""
    for directory in ("sources.list.d", "lists/partial", "cache/archives/partial"):
        (state / directory).mkdir(parents=True, exist_ok=True)
    (state / "sources.list").write_text(SOURCES)
    settings = {
        "Dir::Etc::SourceList": state / "sources.list",
        "Dir::Etc::SourceParts": state / "sources.list.d",
        "Dir::State::Lists": state / "lists",
        "Dir::Cache": state / "cache",
    }
    if os.geteuid() == 0:
        # apt drops to the _apt user to download, which cannot write here.
        settings["APT::Sandbox::User"] = "root"
    return tuple(option for name, value in settings.items() for option in ("-o", f"{name}={value}"))
