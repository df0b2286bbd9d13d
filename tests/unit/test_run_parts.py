"""The pieces of `pyvmm run` that need no VM: module resolution, /init, the stdio share."""

from __future__ import annotations

import contextlib
import errno
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import threading

import pytest
import zstandard

from tests.assets import make_bzimage
from tests.unit.fuse_client import FuseClient
from vmm.errors import PyvmmError
from vmm.fuse import protocol as p
from vmm.fuse.request import BytesRequest, Deferred
from vmm.run import modules
from vmm.run.init_program import InitProgram, Mount
from vmm.run.initramfs import hidden_working_directory
from vmm.run.modules import guest_modules, kernel_release
from vmm.run.runner import guest_environment
from vmm.run.stdio_share import STATUS, STDERR, STDIN, STDOUT, StdioShare

# -- modules ----------------------------------------------------------------------------------


def fake_module(name: str, depends: str = "") -> bytes:
    return b"\x7fELF" + f"\0name={name}\0depends={depends}\0".encode()


# As kbuild's CONFIG_MODULE_COMPRESS_* writes them (xz with CRC32 checks, which the kernel's
# own decompressor needs).
COMPRESSIONS = {
    ".ko": lambda data: data,
    ".ko.gz": lambda data: gzip.compress(data, mtime=0),
    ".ko.xz": lambda data: lzma.compress(data, check=lzma.CHECK_CRC32),
    ".ko.zst": lambda data: zstandard.ZstdCompressor().compress(data),
}


def module_tree(root, modules: dict[str, str], *, builtin=(), with_dep: bool = False, suffix: str = ".ko"):
    """modules: name -> its depends= value; laid out as a distribution package has them."""
    order = []
    for name, depends in modules.items():
        path = f"kernel/drivers/{name}{suffix}"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(COMPRESSIONS[suffix](fake_module(name, depends)))
        order.append(path)
    (root / "modules.order").write_text("".join(line + "\n" for line in order))
    (root / "modules.builtin").write_text("".join(f"kernel/fs/{name}.ko\n" for name in builtin))
    if with_dep:
        (root / "modules.dep").write_text("".join(
            f"kernel/drivers/{name}{suffix}: " + " ".join(f"kernel/drivers/{d}{suffix}" for d in depends.split(",") if d)
            + "\n"
            for name, depends in modules.items()))
    return root


DEBIAN_LIKE = {"virtio_mmio": "virtio,virtio_ring", "virtio": "", "virtio_ring": "", "fuse": "",
               "virtiofs": "fuse,virtio,virtio_ring", "pvpanic": "", "pvpanic-mmio": "pvpanic"}


@pytest.mark.parametrize("with_dep", [False, True])
def test_modules_come_after_their_dependencies(tmp_path, with_dep):
    order = [name for name, _ in guest_modules(module_tree(tmp_path, DEBIAN_LIKE, with_dep=with_dep))]
    assert set(order) == {"virtio_mmio", "virtio", "virtio_ring", "fuse", "virtiofs", "pvpanic", "pvpanic_mmio"}
    for name, depends in DEBIAN_LIKE.items():
        for dependency in filter(None, depends.split(",")):
            assert order.index(dependency) < order.index(name.replace("-", "_"))


@pytest.mark.parametrize("with_dep", [False, True])
@pytest.mark.parametrize("suffix", [".ko.gz", ".ko.xz", ".ko.zst"])
def test_compressed_modules_reach_the_guest_decompressed(tmp_path, suffix, with_dep):
    modules = guest_modules(module_tree(tmp_path, DEBIAN_LIKE, with_dep=with_dep, suffix=suffix))
    assert [name for name, _ in modules][-1] == "pvpanic_mmio"
    for name, contents in modules:
        original = next(n for n in DEBIAN_LIKE if n.replace("-", "_") == name)
        assert contents == fake_module(original, DEBIAN_LIKE[original])


@pytest.mark.parametrize("contents", [b"not zstd at all", zstandard.ZstdCompressor().compress(b"no ELF header")])
def test_a_module_that_does_not_decompress_to_elf_is_one_error(tmp_path, contents):
    tree = module_tree(tmp_path, {"virtio_mmio": "", "virtiofs": ""}, suffix=".ko.zst")
    (tree / "kernel/drivers/virtiofs.ko.zst").write_bytes(contents)
    with pytest.raises(PyvmmError, match=r"^--modules .*: virtiofs\.ko\.zst (does not decompress|is not a kernel module)"):
        guest_modules(tree)


@pytest.mark.parametrize("suffix", [".ko.gz", ".ko.xz", ".ko.zst"])
def test_a_module_that_inflates_past_the_limit_is_refused(tmp_path, monkeypatch, suffix):
    """A corrupt or hostile module cannot make pyvmm inflate it without bound."""
    monkeypatch.setattr(modules, "MAX_MODULE_SIZE", 1 << 20)
    compress = {".ko.gz": gzip.compress, ".ko.xz": lzma.compress, ".ko.zst": zstandard.ZstdCompressor().compress}
    bomb = compress[suffix](b"\x7fELF" + bytes(3 << 20))
    with pytest.raises(PyvmmError, match="decompresses to more than 1 MiB"):
        modules.decompress_module(f"virtiofs{suffix}", bomb)
    assert modules.decompress_module(f"virtiofs{suffix}", compress[suffix](b"\x7fELF small")) == b"\x7fELF small"


@pytest.mark.parametrize("suffix", [".ko.gz", ".ko.xz", ".ko.zst"])
def test_a_truncated_module_is_refused(suffix):
    """A module has no size trailer: the stream's own end must be there, or it is cut short."""
    compress = {".ko.gz": gzip.compress, ".ko.xz": lzma.compress, ".ko.zst": zstandard.ZstdCompressor().compress}
    whole = compress[suffix](b"\x7fELF" + os.urandom(1 << 16))
    with pytest.raises(PyvmmError, match=f"virtiofs{suffix} does not decompress"):
        modules.decompress_module(f"virtiofs{suffix}", whole[: len(whole) * 3 // 4])


def test_built_in_modules_are_not_loaded(tmp_path):
    tree = module_tree(tmp_path, {"virtio_mmio": "", "virtiofs": "fuse"}, builtin=("fuse",))
    assert [name for name, _ in guest_modules(tree)] == ["virtio_mmio", "virtiofs"]


def test_a_kernel_without_virtio_fs_is_named(tmp_path):
    tree = module_tree(tmp_path, {"virtio_mmio": ""})
    with pytest.raises(PyvmmError, match="CONFIG_VIRTIO_FS"):
        guest_modules(tree)


def test_overlayfs_is_loaded_only_when_asked_for_and_named_when_missing(tmp_path):
    tree = module_tree(tmp_path, {"virtio_mmio": "", "virtiofs": "", "overlay": ""})
    assert "overlay" not in [name for name, _ in guest_modules(tree)]
    assert [name for name, _ in guest_modules(tree, overlay=True)][-1] == "overlay"
    (tree / "kernel/drivers/overlay.ko").unlink()
    (tree / "modules.order").write_text("kernel/drivers/virtio_mmio.ko\nkernel/drivers/virtiofs.ko\n")
    with pytest.raises(PyvmmError, match="CONFIG_OVERLAY_FS"):
        guest_modules(tree, overlay=True)


def test_a_missing_dependency_is_named(tmp_path):
    tree = module_tree(tmp_path, {"virtio_mmio": "", "virtiofs": "fuse"})
    with pytest.raises(PyvmmError, match="module fuse, needed by virtiofs, is missing"):
        guest_modules(tree)


def test_the_kernel_release_comes_from_the_bzimage_header(tmp_path):
    image = bytearray(make_bzimage(b"payload"))
    version = b"6.1.0-99-test (builder@example) #1 SMP\0"
    where = 0x300  # inside the setup sectors
    image[where + 0x200 : where + 0x200 + len(version)] = version
    struct.pack_into("<H", image, 0x20E, where)
    (tmp_path / "bzImage").write_bytes(image)
    assert kernel_release(tmp_path / "bzImage") == "6.1.0-99-test"
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + bytes(4096))
    with pytest.raises(PyvmmError, match="not a bzImage"):
        kernel_release(tmp_path / "vmlinux")


# -- /init ----------------------------------------------------------------------------------


def run_init_sandboxed(tmp_path, program: InitProgram) -> subprocess.CompletedProcess:
    """Run /init on the host in a user and PID namespace: its power-off can only end that namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed: apt-get install util-linux")
    path = tmp_path / "init"
    path.write_bytes(program.build())
    path.chmod(0o755)
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", str(path)],
                            capture_output=True, timeout=30)
    if b"unshare:" in result.stderr:
        pytest.skip(f"host limitation: no user namespaces here ({result.stderr.decode().strip()})")
    return result


def test_init_execs_its_program_with_arguments_and_environment(tmp_path):
    program = InitProgram(argv=[b"/bin/sh", b"-c", b'echo "$0 $1 $GREETING"', b"zero", b"one"],
                          env=[b"GREETING=hello"])
    result = run_init_sandboxed(tmp_path, program)
    assert (result.returncode, result.stdout) == (0, b"zero one hello\n")


def test_init_makes_an_overlays_directories_with_their_modes_before_mounting(tmp_path):
    private = tmp_path / os.fsdecode(b"private-\xff")  # a host path need not be UTF-8
    upper, work = private / ".upper", private / ".work"
    # Not a mount namespace of its own: the mount fails, which this one may.
    overlay = Mount("overlay", str(private), "overlay", required=False,
                    make_first=((str(upper), 0o1777), (str(work), 0o700)))
    program = InitProgram(mounts=[overlay], argv=[b"/usr/bin/stat", b"-c", b"%a", os.fsencode(upper), os.fsencode(work)])
    result = run_init_sandboxed(tmp_path, program)
    assert (result.returncode, result.stdout) == (0, b"1777\n700\n"), result.stderr


def test_init_reports_a_failed_step_with_its_errno(tmp_path):
    result = run_init_sandboxed(tmp_path, InitProgram(modules=["/no/such/module.ko"], argv=[b"/bin/true"]))
    assert result.stderr == b"pyvmm-init: cannot open /no/such/module.ko (errno 002)\n"
    assert result.returncode != 0


@pytest.mark.parametrize(("cwd", "writable", "shared"), [
    ("/home/user/src", [], None),               # the host's root shows it
    ("/tmp/build", [], "/tmp/build"),           # the guest's /tmp hides it
    ("/tmp", [], "/tmp"),
    ("/var/tmp/x", [], "/var/tmp/x"),
    ("/run/user/1000/x", [], "/run/user/1000/x"),
    ("/dev/shm/x", [], "/dev/shm/x"),
    ("/tmp/build", ["/tmp"], None),             # --rw shows it
    ("/tmp/build", ["/tmp/build"], None),
    ("/tmp/build", ["/tmp/build/out"], "/tmp/build"),
    ("/tmpx/build", [], None),                  # not under /tmp
])
def test_a_working_directory_the_guests_tmpfs_hide_is_shared(cwd, writable, shared):
    assert hidden_working_directory(cwd, writable) == shared


# -- the stdio share ----------------------------------------------------------------------------


class StdioHarness:
    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.statuses: list[int] = []
        self.closed: list[str] = []
        self.stopping = threading.Event()
        self.share = StdioShare(stdin_fd=self.stdin_r, stdout_fd=self.out_w, stderr_fd=self.out_w,
                                on_status=self.statuses.append, output_closed=self.closed.append,
                                give_up=self.stopping.is_set)
        self.client = FuseClient(self.share)
        self.client.init()

    def open(self, node: int, flags: int) -> int:
        assert self.client.lookup({STDIN: b"stdin", STDOUT: b"stdout", STDERR: b"stderr",
                                   STATUS: b"status"}[node])[0] == node
        return self.client.open(node, flags)

    def close(self) -> None:
        for fd in (self.stdin_r, self.stdin_w, self.out_r, self.out_w):
            os.close(fd)


@pytest.fixture
def stdio():
    harness = StdioHarness()
    yield harness
    harness.close()


def test_writes_to_stdout_reach_the_fd_unchanged(stdio):
    fh = stdio.open(STDOUT, os.O_WRONLY)
    data = bytes(range(256)) * 100
    assert stdio.client.write(STDOUT, fh, 12345, data) == len(data)
    assert os.read(stdio.out_r, 1 << 20) == data


def test_a_write_to_a_closed_stdout_fails_with_epipe_and_reports_it_once(stdio):
    fh = stdio.open(STDOUT, os.O_WRONLY)
    os.close(stdio.out_r)  # the reader exited (`pyvmm run ... | head`)
    stdio.out_r = os.open(os.devnull, os.O_RDONLY)  # for close()
    write = p.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0)
    assert stdio.client.error(p.WRITE, STDOUT, write, b"hello") == errno.EPIPE
    assert stdio.client.error(p.WRITE, STDOUT, write, b"again") == errno.EPIPE
    assert stdio.closed == [f"fd {stdio.out_w} was closed (Broken pipe)"]


def test_a_write_nobody_reads_is_dropped_once_the_run_stops(stdio):
    fh = stdio.open(STDOUT, os.O_WRONLY)
    os.set_blocking(stdio.out_w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(stdio.out_w, bytes(65536))  # fill the pipe: nobody reads it
    os.set_blocking(stdio.out_w, True)
    codes = []
    writer = threading.Thread(target=lambda: codes.append(
        stdio.client.error(p.WRITE, STDOUT, p.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0), b"stuck")))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # waiting for the reader, as a pipe's writer does
    stdio.stopping.set()  # a signal, --timeout: the run stops
    writer.join(30)  # bounds a hang only
    assert not writer.is_alive()
    assert codes == [errno.EPIPE]
    assert stdio.closed == []  # dropped, not closed: nothing to report


def test_a_status_write_reports_the_status(stdio):
    fh = stdio.open(STATUS, os.O_WRONLY | os.O_TRUNC)
    stdio.client.write(STATUS, fh, 0, b"42\n")
    assert stdio.statuses == [42]
    assert stdio.client.error(p.WRITE, STATUS, p.WRITE_IN.pack(fh, 0, 4, 0, 0, 0, 0), b"oops") == errno.EINVAL


def test_streams_open_only_in_their_direction(stdio):
    assert stdio.client.error(p.OPEN, STDIN, p.OPEN_IN.pack(os.O_WRONLY, 0)) == errno.EACCES
    assert stdio.client.error(p.OPEN, STDOUT, p.OPEN_IN.pack(os.O_RDONLY, 0)) == errno.EACCES
    assert stdio.client.error(p.OPEN, STDOUT, p.OPEN_IN.pack(os.O_RDWR, 0)) == errno.EACCES
    assert stdio.client.error(p.LOOKUP, p.ROOT_ID, b"other\0") == errno.ENOENT


def deferred_read(stdio, fh: int, unique: int):
    header = p.IN_HEADER.pack(p.IN_HEADER.size + p.READ_IN.size, p.READ, unique, STDIN, 0, 0, 0, 0, 0)
    deferred = stdio.share.handle(BytesRequest(header + p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)))
    assert isinstance(deferred, Deferred)
    answered, replies = threading.Event(), []
    deferred.then(lambda reply: (replies.append(reply), answered.set()))
    return answered, replies


def test_a_read_of_stdin_waits_for_input_then_sees_end_of_file(stdio):
    fh = stdio.open(STDIN, os.O_RDONLY)
    answered, replies = deferred_read(stdio, fh, 77)
    assert not answered.wait(0.2)  # nothing typed yet: no answer
    os.write(stdio.stdin_w, b"typed\n")
    assert answered.wait(10)
    assert (replies[0].unique, replies[0].error, replies[0].body) == (77, 0, b"typed\n")
    answered, replies = deferred_read(stdio, fh, 78)
    os.close(stdio.stdin_w)
    stdio.stdin_w = os.open(os.devnull, os.O_WRONLY)  # for close()
    assert answered.wait(10)
    assert (replies[0].unique, replies[0].body) == (78, b"")
    assert stdio.client.read(STDIN, fh, 0, 4096) == b""  # and at once from then on


# -- the command's environment --------------------------------------------------------------------


def test_the_guest_gets_the_host_environment_less_session_services(monkeypatch):
    monkeypatch.setenv("KEEP_ME", "yes")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/user/0/agent")
    env = dict(item.split(b"=", 1) for item in guest_environment(["KEEP_ME=overridden", "NEW=a=b"], "/work"))
    assert env[b"KEEP_ME"] == b"overridden" and env[b"NEW"] == b"a=b" and env[b"PWD"] == b"/work"
    assert b"SSH_AUTH_SOCK" not in env and b"PATH" in env


@pytest.mark.parametrize("item", ["NOEQUALS", "1BAD=x", "=x", "A-B=x"])
def test_bad_env_options_are_refused(item):
    with pytest.raises(PyvmmError, match="NAME=VALUE"):
        guest_environment([item], "/")
