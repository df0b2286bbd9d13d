"""The FUSE server on a temporary host tree, driven request by request, without a VM."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from tests.unit.fuse_client import FuseClient, names, setattr_in
from vmm.fuse import protocol as p
from vmm.fuse.server import FuseServer

# Positions in the attr tuple (struct fuse_attr).
INO, SIZE, MODE = 0, 1, 9


@pytest.fixture
def tree(tmp_path):
    share = tmp_path / "share"
    (share / "dir").mkdir(parents=True)
    (share / "file").write_bytes(b"hello world\n")
    (share / "dir" / "inner").write_bytes(b"inner\n")
    (tmp_path / "secret").write_bytes(b"outside the share\n")
    os.symlink("../secret", share / "up")
    os.symlink(str(tmp_path / "secret"), share / "absolute")
    return share


def serve(root, readonly=False) -> FuseClient:
    client = FuseClient(FuseServer(str(root), readonly=readonly))
    client.init()
    return client


@pytest.fixture
def rw(tree):
    client = serve(tree)
    yield client
    client.server.close()


@pytest.fixture
def ro(tree):
    client = serve(tree, readonly=True)
    yield client
    client.server.close()


def snapshot(root) -> dict[str, tuple]:
    """Every path under `root` with its type, mode, size and content (or link target)."""
    result = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            content = (os.readlink(path) if stat.S_ISLNK(st.st_mode)
                       else open(path, "rb").read() if stat.S_ISREG(st.st_mode) else None)
            result[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return result


# -- the session ---------------------------------------------------------------------------


def test_init_negotiates_what_the_server_supports(tree):
    client = FuseClient(FuseServer(str(tree), readonly=True))
    major, minor, _readahead, flags, _bg, _cong, max_write, _gran, max_pages, _align, _flags2 = client.init()
    assert (major, minor) == (7, 31)
    assert max_write == 1 << 20 and max_pages == 256
    assert flags & p.DO_READDIRPLUS and flags & p.MAX_PAGES
    client.server.close()


def test_requests_before_init_fail_with_eio(tree):
    client = FuseClient(FuseServer(str(tree), readonly=True))
    assert client.error(p.LOOKUP, p.ROOT_ID, b"file\0") == errno.EIO
    client.server.close()


# -- reading -------------------------------------------------------------------------------


def test_lookup_getattr_open_read(rw, tree):
    nodeid, attr = rw.lookup(b"file")
    assert nodeid > p.ROOT_ID
    assert attr[SIZE] == 12 and stat.S_ISREG(attr[MODE]) and attr[INO] == os.stat(tree / "file").st_ino
    assert rw.getattr(nodeid) == attr
    fh = rw.open(nodeid, os.O_RDONLY)
    assert rw.read(nodeid, fh, 0, 4096) == b"hello world\n"
    assert rw.read(nodeid, fh, 6, 3) == b"wor"
    assert rw.read(nodeid, fh, 100, 10) == b""
    rw.release(nodeid, fh)
    assert rw.error(p.READ, nodeid, p.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0)) == errno.EBADF
    assert rw.error(p.READ, nodeid, p.READ_IN.pack(0, 0, 10, 0, 0, 0, 0)) == errno.EBADF


def test_a_read_only_share_reads_files_without_opening_them(ro):
    nodeid, _ = ro.lookup(b"file")
    # ENOSYS: the kernel stops sending OPEN and RELEASE, and reads with file handle 0.
    assert ro.error(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)) == errno.ENOSYS
    assert ro.read(nodeid, 0, 6, 100) == b"world\n"
    dir_id, _ = ro.lookup(b"dir")
    assert ro.error(p.READ, dir_id, p.READ_IN.pack(0, 0, 10, 0, 0, 0, 0)) == errno.EACCES
    link_id, _ = ro.lookup(b"up")
    assert ro.error(p.READ, link_id, p.READ_IN.pack(0, 0, 10, 0, 0, 0, 0)) == errno.ELOOP
    ro.forget(nodeid)
    assert ro.error(p.READ, nodeid, p.READ_IN.pack(0, 0, 10, 0, 0, 0, 0)) == errno.ESTALE


def test_the_same_inode_gets_the_same_node_id(ro):
    first, _ = ro.lookup(b"file")
    second, _ = ro.lookup(b"file")
    assert first == second


def test_a_missing_name_is_a_negative_entry(ro):
    assert ro.lookup(b"nothing-here")[0] == 0


def test_lookup_in_a_subdirectory(ro):
    directory, attr = ro.lookup(b"dir")
    assert stat.S_ISDIR(attr[MODE])
    _, attr = ro.lookup(b"inner", directory)
    assert attr[SIZE] == 6


def test_readdir_lists_everything_once(ro, tree):
    entries = ro.readdir(p.ROOT_ID)
    assert sorted(name for name, _, _ in entries) == sorted([b".", b"..", *(os.fsencode(n) for n in os.listdir(tree))])
    # Small reply buffers: the listing continues from each entry's offset.
    assert sorted(ro.readdir(p.ROOT_ID, size=40)) == sorted(entries)


def test_readdirplus_counts_a_lookup_for_each_entry_but_dot_and_dotdot(ro):
    entries = ro.readdir(p.ROOT_ID, plus=True)
    by_name = {name: nodeid for name, nodeid, _ in entries}
    assert by_name[b"."] == 0 and by_name[b".."] == 0
    file_id = by_name[b"file"]
    assert file_id == ro.lookup(b"file")[0]
    ro.forget(file_id, 2)  # the readdirplus reference and the lookup
    assert ro.error(p.GETATTR, file_id, p.GETATTR_IN.pack(0, 0, 0)) == errno.ESTALE


def test_symlinks_are_read_not_followed(ro):
    nodeid, attr = ro.lookup(b"up")
    assert stat.S_ISLNK(attr[MODE])
    assert ro.ok(p.READLINK, nodeid) == b"../secret"
    assert ro.error(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)) == errno.ELOOP


def test_statfs(ro):
    blocks, *_ = p.STATFS_OUT.unpack(ro.ok(p.STATFS))
    assert blocks > 0


# -- names that would leave the share --------------------------------------------------------


@pytest.mark.parametrize("name", [b"..", b".", b"dir/inner", b"../secret", b"/etc", b""])
def test_names_that_are_not_one_component_are_refused(ro, name):
    assert ro.error(p.LOOKUP, p.ROOT_ID, name + b"\0") == errno.EINVAL


def test_a_name_without_its_nul_is_refused(ro):
    assert ro.error(p.LOOKUP, p.ROOT_ID, b"file") == errno.EINVAL


def test_a_too_long_name_is_refused(ro):
    assert ro.error(p.LOOKUP, p.ROOT_ID, b"x" * 300 + b"\0") == errno.ENAMETOOLONG


def test_creating_through_a_symlink_is_refused_and_the_target_untouched(rw, tree):
    before = (tree.parent / "secret").read_bytes()
    code = rw.error(p.CREATE, p.ROOT_ID, p.CREATE_IN.pack(os.O_WRONLY | os.O_TRUNC, 0o100644, 0, 0), b"up\0")
    assert code == errno.ELOOP
    assert (tree.parent / "secret").read_bytes() == before


def test_setattr_on_a_symlink_is_refused(rw, tree):
    nodeid, _ = rw.lookup(b"absolute")
    assert rw.error(p.SETATTR, nodeid, setattr_in(p.FATTR_SIZE, size=0)) == errno.ELOOP
    assert (tree.parent / "secret").read_bytes() == b"outside the share\n"


def test_link_of_a_symlink_is_refused(rw):
    nodeid, _ = rw.lookup(b"up")
    assert rw.error(p.LINK, p.ROOT_ID, p.LINK_IN.pack(nodeid), b"hard\0") == errno.ELOOP


def test_node_ids_never_handed_out_are_refused(ro):
    for nodeid in (0, 2, 12345, 1 << 63):
        assert ro.error(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)) == errno.ESTALE
        assert ro.error(p.LOOKUP, nodeid, b"file\0") == errno.ESTALE


def test_a_forgotten_node_id_is_refused(ro):
    nodeid, _ = ro.lookup(b"file")
    ro.lookup(b"file")
    ro.forget(nodeid, 1)
    assert ro.getattr(nodeid)  # one lookup is still held
    ro.forget(nodeid, 1)
    assert ro.error(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)) == errno.ESTALE
    # Found again, it gets a new ID: the old one stays dead.
    again, _ = ro.lookup(b"file")
    assert again != nodeid


def test_the_root_cannot_be_forgotten(ro):
    ro.forget(p.ROOT_ID, 100)
    assert ro.lookup(b"file")[0]


def test_file_handles_of_another_node_are_refused(ro):
    file_id, _ = ro.lookup(b"file")
    dir_id, _ = ro.lookup(b"dir")
    inner_id, _ = ro.lookup(b"inner", dir_id)
    fh = p.OPEN_OUT.unpack(ro.ok(p.OPENDIR, dir_id, p.OPEN_IN.pack(0, 0)))[0]
    assert ro.error(p.READDIR, inner_id, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)) == errno.EBADF
    assert ro.error(p.READ, file_id, p.READ_IN.pack(fh + 100, 0, 10, 0, 0, 0, 0)) == errno.EBADF
    assert ro.error(p.READ, dir_id, p.READ_IN.pack(fh, 0, 10, 0, 0, 0, 0)) == errno.EISDIR


@pytest.mark.parametrize("readonly", [True, False])
def test_host_device_nodes_are_not_opened(readonly):
    client = serve("/dev", readonly=readonly)
    nodeid, attr = client.lookup(b"null")
    assert stat.S_ISCHR(attr[MODE])
    assert client.error(p.OPEN, nodeid, p.OPEN_IN.pack(os.O_RDONLY, 0)) == errno.EACCES
    assert client.error(p.READ, nodeid, p.READ_IN.pack(0, 0, 10, 0, 0, 0, 0)) in (errno.EACCES, errno.EBADF)
    client.server.close()


# -- read-only is the server's rule ------------------------------------------------------------


def test_a_read_only_share_refuses_every_change(ro, tree):
    before = snapshot(tree.parent)
    file_id, _ = ro.lookup(b"file")
    dir_id, _ = ro.lookup(b"dir")
    changes = [
        (p.SETATTR, file_id, setattr_in(p.FATTR_SIZE, size=0)),
        (p.SETATTR, file_id, setattr_in(p.FATTR_MODE, mode=0o777)),
        (p.SYMLINK, p.ROOT_ID, names(b"new", b"/etc/passwd")),
        (p.MKNOD, p.ROOT_ID, p.MKNOD_IN.pack(0o10644, 0, 0, 0) + names(b"fifo")),
        (p.MKDIR, p.ROOT_ID, p.MKDIR_IN.pack(0o755, 0) + names(b"newdir")),
        (p.UNLINK, p.ROOT_ID, names(b"file")),
        (p.RMDIR, p.ROOT_ID, names(b"dir")),
        (p.RENAME, p.ROOT_ID, p.RENAME_IN.pack(dir_id) + names(b"file", b"moved")),
        (p.RENAME2, p.ROOT_ID, p.RENAME2_IN.pack(p.ROOT_ID, 0, 0) + names(b"file", b"moved")),
        (p.LINK, p.ROOT_ID, p.LINK_IN.pack(file_id) + names(b"hard")),
        (p.OPEN, file_id, p.OPEN_IN.pack(os.O_WRONLY, 0)),
        (p.OPEN, file_id, p.OPEN_IN.pack(os.O_RDWR, 0)),
        (p.OPEN, file_id, p.OPEN_IN.pack(os.O_RDONLY | os.O_TRUNC, 0)),
        (p.CREATE, p.ROOT_ID, p.CREATE_IN.pack(os.O_WRONLY, 0o100644, 0, 0) + names(b"created")),
        (p.ACCESS, file_id, p.ACCESS_IN.pack(os.W_OK, 0)),
    ]
    for opcode, nodeid, body in changes:
        assert ro.error(opcode, nodeid, body) == errno.EROFS, opcode
    assert ro.error(p.WRITE, file_id, p.WRITE_IN.pack(0, 0, 3, 0, 0, 0, 0), b"bad") == errno.EROFS
    assert ro.error(p.FALLOCATE, file_id, p.FALLOCATE_IN.pack(0, 0, 4096, 0, 0)) == errno.EROFS
    assert snapshot(tree.parent) == before


# -- writing -------------------------------------------------------------------------------------


def test_create_write_read_truncate(rw, tree):
    nodeid, fh = rw.create(b"new", 0o640)
    assert rw.write(nodeid, fh, 0, b"abcdef") == 6
    assert rw.write(nodeid, fh, 10, b"xyz") == 3
    assert (tree / "new").read_bytes() == b"abcdef\0\0\0\0xyz"
    assert stat.S_IMODE(os.stat(tree / "new").st_mode) == 0o640
    rw.ok(p.SETATTR, nodeid, setattr_in(p.FATTR_SIZE | p.FATTR_FH, fh=fh, size=3))
    assert rw.read(nodeid, fh, 0, 100) == b"abc"
    rw.ok(p.FSYNC, nodeid, p.FSYNC_IN.pack(fh, 0, 0))
    assert rw.error(p.FLUSH, nodeid, p.RELEASE_IN.pack(fh, 0, 0, 0)) == errno.ENOSYS  # the kernel stops sending it
    rw.release(nodeid, fh)
    assert len(rw.server.handles) == 0


def test_writes_need_a_writable_handle(rw):
    nodeid, _ = rw.lookup(b"file")
    fh = rw.open(nodeid, os.O_RDONLY)
    assert rw.error(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, 3, 0, 0, 0, 0), b"bad") == errno.EBADF


def test_a_write_longer_than_its_data_is_refused(rw, tree):
    nodeid, fh = rw.create(b"new")
    assert rw.error(p.WRITE, nodeid, p.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0), b"short") == errno.EINVAL
    assert (tree / "new").read_bytes() == b""


def test_directories_links_and_renames(rw, tree):
    dir_id = p.ENTRY_OUT.unpack(rw.ok(p.MKDIR, p.ROOT_ID, p.MKDIR_IN.pack(0o755, 0), names(b"sub")))[0]
    file_id, _ = rw.lookup(b"file")
    rw.ok(p.LINK, dir_id, p.LINK_IN.pack(file_id), names(b"hard"))
    assert os.stat(tree / "sub" / "hard").st_ino == os.stat(tree / "file").st_ino
    rw.ok(p.SYMLINK, dir_id, names(b"soft", b"../file"))
    assert os.readlink(tree / "sub" / "soft") == "../file"
    rw.ok(p.RENAME, p.ROOT_ID, p.RENAME_IN.pack(dir_id), names(b"file", b"moved"))
    assert (tree / "sub" / "moved").read_bytes() == b"hello world\n"
    assert rw.error(p.RENAME2, dir_id, p.RENAME2_IN.pack(dir_id, 1, 0), names(b"moved", b"hard")) == errno.EEXIST
    rw.ok(p.RENAME2, dir_id, p.RENAME2_IN.pack(p.ROOT_ID, 2, 0), names(b"moved", b"dir"))  # exchange
    assert (tree / "dir").read_bytes() == b"hello world\n" and (tree / "sub" / "moved" / "inner").exists()
    assert rw.error(p.RENAME2, dir_id, p.RENAME2_IN.pack(dir_id, 4, 0), names(b"hard", b"x")) == errno.EINVAL
    rw.ok(p.UNLINK, dir_id, names(b"hard"))
    rw.ok(p.UNLINK, dir_id, names(b"soft"))
    assert rw.error(p.RMDIR, p.ROOT_ID, names(b"sub")) == errno.ENOTEMPTY
    rw.ok(p.UNLINK, p.ROOT_ID, names(b"dir"))
    assert not (tree / "dir").exists()


def test_privilege_bits_are_dropped(rw, tree):
    nodeid, fh = rw.create(b"tool", 0o4755)
    assert stat.S_IMODE(os.stat(tree / "tool").st_mode) == 0o755
    rw.ok(p.SETATTR, nodeid, setattr_in(p.FATTR_MODE, mode=0o6777))
    assert stat.S_IMODE(os.stat(tree / "tool").st_mode) == 0o777
    rw.ok(p.MKDIR, p.ROOT_ID, p.MKDIR_IN.pack(0o2775, 0), names(b"shared"))
    assert stat.S_IMODE(os.stat(tree / "shared").st_mode) & 0o7000 == 0


def test_device_nodes_cannot_be_made(rw, tree):
    for kind in (stat.S_IFCHR, stat.S_IFBLK):
        body = p.MKNOD_IN.pack(kind | 0o666, os.makedev(1, 3), 0, 0) + names(b"null")
        assert rw.error(p.MKNOD, p.ROOT_ID, body) == errno.EPERM
    assert not (tree / "null").exists()
    rw.ok(p.MKNOD, p.ROOT_ID, p.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0), names(b"fifo"))
    assert stat.S_ISFIFO(os.lstat(tree / "fifo").st_mode)


def test_fallocate_lseek_copy_file_range(rw, tree):
    source, source_fh = rw.create(b"source")
    rw.write(source, source_fh, 0, b"0123456789")
    target, target_fh = rw.create(b"target")
    rw.ok(p.FALLOCATE, target, p.FALLOCATE_IN.pack(target_fh, 0, 8192, 0, 0))
    assert os.stat(tree / "target").st_size == 8192
    body = rw.ok(p.COPY_FILE_RANGE, source, p.COPY_FILE_RANGE_IN.pack(source_fh, 2, target, target_fh, 0, 5, 0))
    assert p.WRITE_OUT.unpack(body)[0] == 5
    assert (tree / "target").read_bytes()[:5] == b"23456"
    offset = p.LSEEK_OUT.unpack(rw.ok(p.LSEEK, source, p.LSEEK_IN.pack(source_fh, 0, os.SEEK_DATA, 0)))[0]
    assert offset == 0


# -- malformed requests: an error reply, never an exception ----------------------------------------


def test_a_short_header_gets_an_error_reply(ro):
    assert ro.raw(b"\x01\x02\x03") == (errno.EINVAL, b"")


def test_a_length_past_the_buffer_gets_an_error_reply(ro):
    header = p.IN_HEADER.pack(4096, p.LOOKUP, 7, p.ROOT_ID, 0, 0, 0, 0, 0)
    assert ro.raw(header + b"file\0") == (errno.EINVAL, b"")
    header = p.IN_HEADER.pack(10, p.LOOKUP, 7, p.ROOT_ID, 0, 0, 0, 0, 0)
    assert ro.raw(header + b"file\0") == (errno.EINVAL, b"")


def test_arguments_cut_short_get_an_error_reply(ro):
    nodeid, _ = ro.lookup(b"file")
    for opcode in (p.OPEN, p.READ, p.SETATTR, p.MKDIR, p.RENAME, p.CREATE, p.INIT, p.ACCESS):
        assert ro.error(opcode, nodeid, b"\x01\x02") in (errno.EINVAL, errno.EROFS), opcode


def test_an_unknown_opcode_gets_enosys(ro):
    assert ro.error(9999) == errno.ENOSYS
    assert ro.error(p.GETXATTR, p.ROOT_ID, p.GETATTR_IN.pack(0, 0, 0)) == errno.ENOSYS


def test_forgets_of_unknown_nodes_and_oversized_batches_are_harmless(ro):
    ro.forget(424242, 5)
    assert ro.request(p.BATCH_FORGET, 0, p.BATCH_FORGET_IN.pack(1000, 0), p.FORGET_ONE.pack(77, 1)) is None
    assert ro.lookup(b"file")[0]


def test_random_requests_never_raise(tree, caplog):
    client = serve(tree)
    rng = random.Random(1234)
    opcodes = list(client.server._operations) + [0, 7, 19, 9999]
    for _ in range(3000):
        opcode = rng.choice(opcodes)
        if opcode == p.INIT:
            continue  # would only reset the session
        body = rng.randbytes(rng.randrange(0, 120))
        length = p.IN_HEADER.size + len(body) + rng.choice([0, 0, 0, -3, 5])
        nodeid = rng.choice([p.ROOT_ID, 2, 3, 0, rng.getrandbits(64)])
        header = p.IN_HEADER.pack(max(0, length), opcode, rng.getrandbits(64), nodeid, 0, 0, 0, 0, 0)
        reply = client.raw(header + body)  # the helper checks the reply's length field
        if reply is not None:
            code, _ = reply
            assert 0 <= code < 4096, (opcode, code)  # success, or an errno the kernel can pass on
    # No request reached the server's last-resort handler (a bug, logged with its traceback),
    # the file outside the share is untouched, and a new session (a DESTROY may have ended
    # this one) is served.
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert (tree.parent / "secret").read_bytes() == b"outside the share\n"
    client.init()
    assert client.error(p.GETATTR, p.ROOT_ID, p.GETATTR_IN.pack(0, 0, 0)) == 0
    client.server.close()


def test_hidden_directories_look_empty(tree):
    client = FuseClient(FuseServer(str(tree), readonly=True, hidden=(str(tree / "dir"),)))
    client.init()
    dir_id, _ = client.lookup(b"dir")  # the directory itself is there
    assert client.lookup(b"inner", dir_id)[0] == 0
    assert [name for name, _, _ in client.readdir(dir_id, plus=True)] == [b".", b".."]
    client.server.close()
