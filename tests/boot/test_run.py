"""`pyvmm run` through the CLI on the Debian cloud kernel: statuses, exact stdio, files, escapes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import pytest

from tests.boot.session import converse_on_a_terminal
from tests.guest.gdb_driver import DebuggedVm
from tests.guest.test_start_imports import imported_modules
from tests.helpers import REPO, die_with_test_runner, read_until
from vmm.console import OUTPUT_GRACE_SECONDS

pytestmark = pytest.mark.slow


@pytest.fixture
def pyvmm_run(linux_assets, linux_module_tree):
    """`pyvmm run ARGS` as a command line, and the environment to run it in."""
    def pyvmm_run(*args: str) -> tuple[list[str], dict[str, str]]:
        command = [sys.executable, "-m", "vmm", "run", "--kernel", str(linux_assets.kernel),
                   "--modules", str(linux_module_tree), *args]
        # PYTHONPATH: the checkout under test first, whatever the working directory
        # (and what was there: inside make test-kvm's L1 it names the packages).
        paths = [str(REPO), os.environ.get("PYTHONPATH")]
        return command, {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}

    return pyvmm_run


@pytest.fixture
def run(pyvmm_run):
    def run(*args: str, input: bytes = b"", cwd=REPO, timeout: float = 600) -> subprocess.CompletedProcess:
        command, env = pyvmm_run(*args)
        return subprocess.run(command, input=input, capture_output=True, cwd=cwd, timeout=timeout, env=env)

    return run


# On each accelerator (`linux_accel`): on KVM where this host's KVM runs Linux, and in
# `make test-kvm`'s L1 otherwise. The other tests take `--accel auto`.
def test_status_stdio_cwd_and_env_exactly(run, linux_accel):
    script = 'pwd; echo "$GREETING"; cat; printf "to stderr\\n" >&2; exit 7'
    result = run("--accel", linux_accel, "--env", "GREETING=hello world", "--", "sh", "-c", script,
                 input=b"binary\0\xff\nend")
    assert result.returncode == 7, result.stderr
    assert result.stdout == f"{REPO}\nhello world\n".encode() + b"binary\0\xff\nend"
    assert result.stderr == b"to stderr\n"


def test_success_prints_nothing_else_and_a_missing_command_is_127(run, linux_accel):
    result = run("--accel", linux_accel, "--", "true")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    result = run("--accel", linux_accel, "--", "no-such-command-anywhere")
    assert result.returncode == 127
    assert b"no-such-command-anywhere" in result.stderr and result.stdout == b""


def test_a_working_directory_in_the_guests_own_tmp_is_shared_read_only(run):
    # The guest has a tmpfs of its own on /tmp, which hides the host's: pyvmm shares
    # the working directory there at its path, read-only as the rest of the host.
    with tempfile.TemporaryDirectory(dir="/tmp") as name:
        work = Path(name)
        (work / "input").write_text("from the host\n")
        script = "pwd; cat input; touch new 2>/dev/null || echo read-only; echo scratch >/tmp/s && cat /tmp/s"
        result = run("--", "sh", "-c", script, cwd=work)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{work}\nfrom the host\nread-only\nscratch\n".encode()
        # Exactly /tmp: the host's files show through an overlay, and what the guest
        # writes there stays in the guest, as in its own tmpfs.
        written = f"{work.name}-from-the-guest"
        result = run("--", "sh", "-c", f"cat {work.name}/input && echo x >{written} && cat {written}", cwd="/tmp")
        assert (result.returncode, result.stdout) == (0, b"from the host\nx\n"), result.stderr
        assert not (Path("/tmp") / written).exists()
        assert os.listdir(work) == ["input"]


def test_a_hundred_thousand_lines_arrive_intact(run):
    result = run("--", "seq", "100000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(b"%d\n" % n for n in range(1, 100001))


def test_timeout_stops_the_guest_with_124(run):
    result = run("--timeout", "20", "--", "sleep", "1000")
    assert result.returncode == 124
    assert result.stderr.startswith(b"pyvmm: the guest was still running after --timeout 20 s")


# As root in the guest: `outb 130, 0xf4`, the debug-exit port, through ioperm and a page of code.
_DEBUG_EXIT_130 = """import ctypes, mmap
assert ctypes.CDLL(None).ioperm(0xF4, 1, 1) == 0
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(b"\\xb0\\x82\\xe6\\xf4\\xc3")  # mov al, 130; out 0xf4, al; ret
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
"""


def test_a_guest_that_ends_itself_with_130_is_not_taken_for_an_interrupt(run):
    # The machine stops with 130 without the command's status: the guest's doing, not Ctrl-C's.
    result = run("--", sys.executable, "-c", _DEBUG_EXIT_130)
    assert result.returncode == 125
    assert result.stderr == b"pyvmm: the guest could not run the command: it stopped without a status\n"


def test_a_large_file_written_through_rw_is_identical_on_the_host(run, tmp_path):
    shared = tmp_path / "out"
    shared.mkdir()
    script = "dd if=/dev/urandom of=data bs=1M count=64 2>/dev/null && md5sum data"
    result = run("--rw", str(shared), "--", "sh", "-c", script, cwd=shared)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0].decode() == hashlib.md5((shared / "data").read_bytes()).hexdigest()
    assert (shared / "data").stat().st_size == 64 << 20


ESCAPES = """
mount -o remount,rw / 2>/dev/null
echo changed >> README.md 2>/dev/null && echo WROTE-README
rm -f pyproject.toml 2>/dev/null; [ -e pyproject.toml ] || echo REMOVED-PYPROJECT
touch new-file-from-guest 2>/dev/null && echo CREATED-FILE
ln README.md "$OUT/hard" 2>/dev/null && echo CROSS-SHARE-LINK
mv README.md "$OUT/moved" 2>/dev/null; [ -e README.md ] || echo MOVED-README
ln -s /etc/hostname "$OUT/escape"; echo through-link > "$OUT/escape" 2>/dev/null && echo WROTE-THROUGH-LINK
mknod "$OUT/disk" b 8 0 2>/dev/null && echo MADE-DEVICE
umount -l /proc /sys 2>/dev/null; ls /proc/1 >/dev/null 2>&1 && echo HOST-PROC-VISIBLE
echo done
"""


def test_escapes_are_refused_and_the_host_is_unchanged(run, tmp_path):
    shared = tmp_path / "out"
    shared.mkdir()
    watched = {name: (REPO / name).read_bytes() for name in ("README.md", "pyproject.toml")}
    result = run("--rw", str(shared), "--env", f"OUT={shared}", "--", "sh", "-c", ESCAPES)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"done\n", result.stdout
    assert {name: (REPO / name).read_bytes() for name in watched} == watched
    assert not (REPO / "new-file-from-guest").exists()
    assert os.readlink(shared / "escape") == "/etc/hostname"  # a symlink the guest made, not followed
    assert not (shared / "disk").exists()


def test_a_kernel_without_virtio_fs_is_named(run, tmp_path, linux_module_tree):
    modules = tmp_path / "modules"
    modules.mkdir()
    shutil.copy(linux_module_tree / "modules.builtin", modules)
    (modules / "modules.order").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    result = run("--modules", str(modules), "--", "true")
    assert result.returncode == 125
    assert result.stderr.count(b"\n") == 1 and b"CONFIG_VIRTIO_FS" in result.stderr


def test_a_guest_that_cannot_start_the_command_is_125(run, tmp_path, linux_module_tree):
    # A module tree whose virtiofs.ko is damaged: the guest's /init cannot load it.
    modules = tmp_path / "modules"
    for line in (linux_module_tree / "modules.order").read_text().split():
        if line.rsplit("/", 1)[-1] in ("virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "fuse.ko", "virtiofs.ko"):
            (modules / line).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(linux_module_tree / line, modules / line)
            with open(modules / "modules.order", "a") as order:
                order.write(line + "\n")
    (modules / "kernel/fs/fuse/virtiofs.ko").write_bytes(b"\x7fELF not really a module")
    result = run("--modules", str(modules), "--", "true")
    assert result.returncode == 125
    assert result.stderr.startswith(b"pyvmm: the guest could not run the command: pyvmm-init: cannot load")


def test_zstd_compressed_modules_as_ubuntu_ships_them(run, tmp_path, linux_module_tree):
    # The modules the guest needs, each .ko.zst, with no modules.dep: pyvmm reads their
    # dependencies from the decompressed .modinfo and hands the guest plain .ko files.
    import zstandard

    modules = tmp_path / "modules"
    order = []
    for line in (linux_module_tree / "modules.order").read_text().split():
        if line.rsplit("/", 1)[-1] in ("virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "fuse.ko", "virtiofs.ko"):
            (modules / line).parent.mkdir(parents=True, exist_ok=True)
            (modules / f"{line}.zst").write_bytes(zstandard.ZstdCompressor().compress((linux_module_tree / line).read_bytes()))
            order.append(f"{line}.zst\n")
    (modules / "modules.order").write_text("".join(order))
    shutil.copy(linux_module_tree / "modules.builtin", modules)
    result = run("--modules", str(modules), "--", "echo", "loaded")
    assert (result.returncode, result.stdout) == (0, b"loaded\n"), result.stderr


def test_dogfood_unit_tests_from_the_read_only_checkout(run):
    tests = ["tests/unit/test_fuse_server.py", "tests/unit/test_virtio_fs.py", "tests/unit/test_memory.py"]
    result = run("--memory", "1G", "--env", "PYTHONDONTWRITEBYTECODE=1", "--",
                 sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert b" passed" in result.stdout


def test_without_a_command_a_shell_runs_on_the_terminal(linux_assets, linux_module_tree):
    # A plain shell; the answer, then the next prompt, before it exits.
    status, output = converse_on_a_terminal(
        [sys.executable, "-m", "vmm", "run", "--kernel", str(linux_assets.kernel), "--modules", str(linux_module_tree)],
        [(b"# ", b"echo $((6*7)); tty\r"), (b"/dev/hvc0\r\n# ", b"exit 3\r")],
        env={"PYTHONPATH": str(REPO), "SHELL": "/bin/sh"})
    assert status == 3, output
    assert b"\r\n42\r\n/dev/hvc0\r\n" in output, output


def test_a_shell_exiting_with_130_itself_leaves_its_last_line_for_a_stopped_terminal(pyvmm_run):
    # A shell whose last command was interrupted (Ctrl-C in the guest) ends with 130 at `exit`;
    # here its last line is written while the user has stopped the terminal's output (Ctrl-S).
    # 130 is then the guest's own status, not a host stop: the line waits for the terminal, as a
    # host shell's would. (Not echoed, so that the line is the only output in flight: a guest
    # writing more waits for the terminal anyway.)
    command, env = pyvmm_run()
    controller, terminal = os.openpty()
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=subprocess.PIPE, cwd=REPO,
                               env={**env, "SHELL": "/bin/sh"}, start_new_session=True,
                               preexec_fn=die_with_test_runner)
    try:
        read_until(controller, b"# ", timeout=300)
        os.write(controller, b"stty -echo\r")
        read_until(controller, b"# ")
        termios.tcflow(terminal, termios.TCOOFF)
        os.write(controller, b"printf 'the last line\\n'; exit 130\r")
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=OUTPUT_GRACE_SECONDS + 2)  # it waits for the terminal...
        termios.tcflow(terminal, termios.TCOON)  # ...which takes the line at last
        assert read_until(controller, b"\n") == b"the last line\r\n"
        assert process.wait(timeout=60) == 130
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
        os.close(controller)
        os.close(terminal)


def test_paused_for_gdb_then_continued_runs_the_command(linux_assets, linux_module_tree):
    vm = DebuggedVm("--kernel", str(linux_assets.kernel), "--modules", str(linux_module_tree),
                    "--", "sh", "-c", "echo debugged; exit 3", subcommand="run", timeout=600)
    try:
        gdb_output = vm.gdb_batch(["continue"], timeout=600)  # returns when the VM has ended
        status = vm.wait()
        stdout = vm.session.process.stdout.read()
    finally:
        vm.close()
    assert "exited with code 03" in gdb_output, gdb_output
    assert (status, stdout) == (3, b"debugged\n")


def test_an_ordinary_user_runs_a_command_and_owns_what_it_writes(unprivileged, linux_assets, linux_module_tree):
    # As a CI job without root would: its own kernel and modules (a /boot/vmlinuz is often
    # root-only), its working directory shared with --rw. The software CPU, so that this
    # host's KVM (which cannot run Linux) is not in the way; /dev/kvm access is tested apart.
    home = unprivileged.home
    kernel = home / "vmlinuz"
    shutil.copy(linux_assets.kernel, kernel)
    modules = home / "modules"
    shutil.copytree(linux_module_tree, modules)
    work = unprivileged.work
    result = unprivileged("-m", "vmm", "run", "--accel", "tcg", "--kernel", str(kernel), "--modules", str(modules),
                          "--rw", str(work), "--", "sh", "-c", "pwd; echo written in the guest >note; cat note",
                          timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{work}\nwritten in the guest\n".encode()
    assert (work / "note").read_bytes() == b"written in the guest\n"
    assert (work / "note").stat().st_uid == unprivileged.user.pw_uid


def test_a_command_printing_forever_is_stopped_when_the_reader_of_its_output_exits(pyvmm_run):
    # `pyvmm run -- sh -c 'while :; do echo x; done' | head`: the shell's builtin echo
    # shrugs off the write error, so only stopping the run ends it (SIGPIPE would, on the host).
    command, env = pyvmm_run("--", "sh", "-c", "while :; do echo x; done")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, env=env, preexec_fn=die_with_test_runner)
    try:
        assert process.stdout.read(100) == b"x\n" * 50
        process.stdout.close()  # the reader exits
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert status == 141
    assert process.stderr.read() == b"pyvmm: stdout was closed (Broken pipe); stopped the guest\n"


def test_only_the_device_types_it_uses_are_imported(pyvmm_run):
    # Start-up time (issue #18): virtio-fs, but not virtio-blk, its disk images, or virtio-net.
    command, env = pyvmm_run("--", "true")
    result = subprocess.run(command, capture_output=True, cwd=REPO, timeout=600, stdin=subprocess.DEVNULL,
                            env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    modules = imported_modules(result.stderr)
    assert "devices.virtio.fs" in modules
    assert sorted(modules & {"devices.virtio.blk", "vmm.image.base", "devices.virtio.net", "devices.virtio.net_backends"}) == []
