"""One shared host directory tree, served to a guest as a FUSE filesystem.

`FuseServer(root, readonly=...)` answers FUSE requests (`handle(request)`
-> `Reply`, or None for the operations that have no reply) by doing the
operation on the host through file descriptors:

- Every host path the server touches is one name in a directory it holds an
  fd for (openat and friends with `dir_fd`), so a name can never walk the
  host tree: names with '/', "." and ".." are refused, the share's root has
  no parent to reach, and no guest path is ever handed to the host whole.
- Symlinks are never followed on the host: lookups open with O_NOFOLLOW,
  CREATE with O_NOFOLLOW (an existing symlink fails with ELOOP), and the
  operations that reopen an inode (open, chmod, truncate, ...) go through
  /proc/self/fd of a node that is not a symlink. The guest resolves its
  symlinks itself, through READLINK, within what it can see.
- Node IDs and file handles the server never gave out, or took back, are
  refused (vmm/fuse/nodes.py).
- A read-only share refuses every change with EROFS here, whatever the
  guest's mount flags say (root in the guest can remount).
- Nothing the guest asks for makes the host more privileged: set-user-ID and
  set-group-ID bits are dropped from modes, device nodes cannot be made,
  and everything runs with pyvmm's own credentials (the uid/gid in a request
  are ignored).

Requests are parsed and answered by vmm/fuse/session.py.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time

from vmm.fuse import protocol as p
from vmm.fuse.nodes import FuseError, Handle, HandleTable, Node, NodeTable
from vmm.fuse.request import FileRange
from vmm.fuse.session import MAX_TRANSFER, Arguments, FuseSession

log = logging.getLogger(__name__)

# How long the guest may cache names and attributes. A read-only share is
# assumed not to change under the guest while it runs; a writable one is
# changed by the guest itself, through this server, and by the host only rarely.
READONLY_CACHE_SECONDS = 60
WRITABLE_CACHE_SECONDS = 1
# Longest copy one COPY_FILE_RANGE carries out (the kernel asks again for the rest).
MAX_COPY = 64 << 20

# O_* flags of OPEN/CREATE passed on to the host; the rest (O_CREAT, O_EXCL,
# O_NOCTTY, O_NONBLOCK, O_DIRECT, O_NOATIME, ...) are the guest's business.
_PASSED_OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
_NO_PRIVILEGE_BITS = ~(stat.S_ISUID | stat.S_ISGID)
_ALLOWED_MKNOD_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_FALLOCATE_MODES = 0x01 | 0x02 | 0x10  # KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _check_libc(result: int) -> None:
    if result != 0:
        raise FuseError(ctypes.get_errno())


def _encode_rdev(rdev: int) -> int:
    """The host's dev_t as the kernel's new_encode_dev(), which FUSE carries in 32 bits."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFF_FFFF


def _attr(st: os.stat_result) -> tuple:
    times = [divmod(ns, 1_000_000_000) for ns in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)]
    return (st.st_ino, st.st_size, st.st_blocks, times[0][0] & 0xFFFF_FFFF_FFFF_FFFF,
            times[1][0] & 0xFFFF_FFFF_FFFF_FFFF, times[2][0] & 0xFFFF_FFFF_FFFF_FFFF,
            times[0][1], times[1][1], times[2][1], st.st_mode, st.st_nlink & 0xFFFF_FFFF,
            st.st_uid, st.st_gid, _encode_rdev(st.st_rdev), st.st_blksize, 0)


class FuseServer(FuseSession):
    def __init__(self, root: str, *, readonly: bool, name: str = "virtio-fs", hidden: tuple[str, ...] = ()) -> None:
        """`hidden`: host directories whose contents the guest does not see (they
        look empty): the host's /proc, /sys and /dev, which the guest replaces
        with its own, are the host's processes and devices, not its files."""
        super().__init__(name)
        self.hidden = set()
        for path in hidden:
            try:
                st = os.stat(path)
            except OSError:
                continue  # nothing there to hide
            self.hidden.add((st.st_dev, st.st_ino))
        # Without ATOMIC_O_TRUNC, an O_TRUNC open on a read-only share is a SETATTR
        # the server refuses, rather than an open the guest's cache believes emptied the file.
        self.init_flags = (p.ASYNC_READ | p.BIG_WRITES | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO
                           | p.PARALLEL_DIROPS | p.MAX_PAGES | p.CACHE_SYMLINKS
                           | (0 if readonly else p.ATOMIC_O_TRUNC))
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.readonly = readonly
        self.nodes = NodeTable(root_fd, p.ROOT_ID)
        self.handles = HandleTable()
        self.cache_seconds = READONLY_CACHE_SECONDS if readonly else WRITABLE_CACHE_SECONDS
        self._operations = {
            p.LOOKUP: self._lookup, p.FORGET: self._forget, p.BATCH_FORGET: self._batch_forget,
            p.GETATTR: self._getattr, p.SETATTR: self._setattr, p.READLINK: self._readlink,
            p.SYMLINK: self._symlink, p.MKNOD: self._mknod, p.MKDIR: self._mkdir,
            p.UNLINK: self._unlink, p.RMDIR: self._rmdir, p.RENAME: self._rename,
            p.RENAME2: self._rename2, p.LINK: self._link, p.OPEN: self._open, p.READ: self._read,
            p.WRITE: self._write, p.STATFS: self._statfs, p.RELEASE: self._release,
            p.RELEASEDIR: self._release, p.FSYNC: self._fsync, p.FSYNCDIR: self._fsync,
            p.INIT: self._init, p.OPENDIR: self._opendir,
            p.READDIR: self._readdir, p.READDIRPLUS: self._readdirplus, p.ACCESS: self._access,
            p.CREATE: self._create, p.FALLOCATE: self._fallocate, p.LSEEK: self._lseek,
            p.COPY_FILE_RANGE: self._copy_file_range, p.DESTROY: self._destroy,
        }

    def close(self) -> None:
        self.forget_everything()
        os.close(self.nodes.root.fd)

    def forget_everything(self) -> None:
        self.handles.close()
        self.nodes.close()

    def _writable(self) -> None:
        if self.readonly:
            raise FuseError(errno.EROFS)

    def _directory(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if not node.is_dir:
            raise FuseError(errno.ENOTDIR)
        return node

    def _not_symlink(self, node: Node) -> Node:
        if node.is_symlink:
            raise FuseError(errno.ELOOP)
        return node

    def _entry(self, parent: Node, name: bytes) -> bytes:
        """Look `name` up in `parent`, count the lookup, and describe it (struct fuse_entry_out)."""
        if parent.key in self.hidden:
            raise FileNotFoundError(errno.ENOENT, "hidden")
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        node = self.nodes.add_lookup(fd, st)
        return self._entry_out(node.nodeid, st)

    def _entry_out(self, nodeid: int, st: os.stat_result | None) -> bytes:
        attr = _attr(st) if st is not None else (0,) * 16
        return p.ENTRY_OUT.pack(nodeid, 0, self.cache_seconds, self.cache_seconds, 0, 0, *attr)

    def _attr_out(self, st: os.stat_result) -> bytes:
        return p.ATTR_OUT.pack(self.cache_seconds, 0, 0, *_attr(st))

    # -- the session -----------------------------------------------------------------

    # -- names -----------------------------------------------------------------------

    def _lookup(self, nodeid: int, args: Arguments) -> bytes:
        parent = self._directory(nodeid)
        name = args.name()
        try:
            return self._entry(parent, name)
        except FileNotFoundError:
            # A negative entry the guest may cache: each failed lookup (a
            # search along $PATH or sys.path) is then asked only once.
            return self._entry_out(0, None)

    def _forget(self, nodeid: int, args: Arguments) -> None:
        (count,) = args.take(p.FORGET_IN)
        self.nodes.forget(nodeid, count)

    def _batch_forget(self, nodeid: int, args: Arguments) -> None:
        count, _ = args.take(p.BATCH_FORGET_IN)
        for _ in range(min(count, args.remaining // p.FORGET_ONE.size)):
            forgotten, lookups = args.take(p.FORGET_ONE)
            self.nodes.forget(forgotten, lookups)

    def _getattr(self, nodeid: int, args: Arguments) -> bytes:
        node = self.nodes.get(nodeid)
        flags, _, fh = args.take(p.GETATTR_IN) if args.remaining else (0, 0, 0)
        if flags & p.GETATTR_FH:
            return self._attr_out(os.fstat(self._file_fd(fh, nodeid)))
        return self._attr_out(os.fstat(node.fd))

    def _setattr(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        node = self._not_symlink(self.nodes.get(nodeid))
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
         mode, _, uid, gid, _) = args.take(p.SETATTR_IN)
        handle = self.handles.get(fh, nodeid) if valid & p.FATTR_FH else None
        if valid & p.FATTR_MODE:
            os.chmod(node.proc_path, stat.S_IMODE(mode) & _NO_PRIVILEGE_BITS)
        if valid & (p.FATTR_UID | p.FATTR_GID):
            os.chown(node.proc_path, uid if valid & p.FATTR_UID else -1, gid if valid & p.FATTR_GID else -1)
        if valid & p.FATTR_SIZE:
            if handle is not None:
                if not handle.writable:
                    raise FuseError(errno.EBADF)
                os.ftruncate(handle.fd, size)
            else:
                os.truncate(node.proc_path, size)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME):
            current = os.fstat(node.fd)
            now = time.time_ns()
            new_atime = current.st_atime_ns
            if valid & p.FATTR_ATIME:
                new_atime = now if valid & p.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec
            new_mtime = current.st_mtime_ns
            if valid & p.FATTR_MTIME:
                new_mtime = now if valid & p.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec
            os.utime(node.proc_path, ns=(new_atime, new_mtime))
        return self._attr_out(os.fstat(node.fd))

    def _readlink(self, nodeid: int, args: Arguments) -> bytes:
        node = self.nodes.get(nodeid)
        if not node.is_symlink:
            raise FuseError(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=node.fd))

    def _symlink(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        parent = self._directory(nodeid)
        name = args.name()
        target = args.text()
        os.symlink(target, name, dir_fd=parent.fd)
        return self._entry(parent, name)

    def _mknod(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        parent = self._directory(nodeid)
        mode, _rdev, _umask, _ = args.take(p.MKNOD_IN)
        name = args.name()
        if stat.S_IFMT(mode) not in _ALLOWED_MKNOD_TYPES:
            raise FuseError(errno.EPERM)  # a device node on the host would be a way out
        os.mknod(name, stat.S_IFMT(mode) | (stat.S_IMODE(mode) & _NO_PRIVILEGE_BITS), dir_fd=parent.fd)
        return self._entry(parent, name)

    def _mkdir(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        parent = self._directory(nodeid)
        mode, _umask = args.take(p.MKDIR_IN)
        name = args.name()
        os.mkdir(name, stat.S_IMODE(mode) & _NO_PRIVILEGE_BITS, dir_fd=parent.fd)
        return self._entry(parent, name)

    def _unlink(self, nodeid: int, args: Arguments) -> None:
        self._writable()
        os.unlink(args.name(), dir_fd=self._directory(nodeid).fd)

    def _rmdir(self, nodeid: int, args: Arguments) -> None:
        self._writable()
        os.rmdir(args.name(), dir_fd=self._directory(nodeid).fd)

    def _rename(self, nodeid: int, args: Arguments) -> None:
        self._writable()
        (newdir,) = args.take(p.RENAME_IN)
        self._rename_names(nodeid, newdir, 0, args)

    def _rename2(self, nodeid: int, args: Arguments) -> None:
        self._writable()
        newdir, flags, _ = args.take(p.RENAME2_IN)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FuseError(errno.EINVAL)  # RENAME_WHITEOUT would make a device node
        self._rename_names(nodeid, newdir, flags, args)

    def _rename_names(self, olddir: int, newdir: int, flags: int, args: Arguments) -> None:
        source, target = self._directory(olddir), self._directory(newdir)
        old, new = args.name(), args.name()
        _check_libc(_libc.renameat2(source.fd, old, target.fd, new, flags))

    def _link(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        (oldnodeid,) = args.take(p.LINK_IN)
        node = self._not_symlink(self.nodes.get(oldnodeid))
        parent = self._directory(nodeid)
        name = args.name()
        os.link(node.proc_path, name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(parent, name)

    # -- files -----------------------------------------------------------------------

    def _open(self, nodeid: int, args: Arguments) -> bytes:
        node = self._not_symlink(self.nodes.get(nodeid))
        flags, _open_flags = args.take(p.OPEN_IN)
        if node.is_dir:
            raise FuseError(errno.EISDIR)
        if not stat.S_ISREG(node.mode):
            # Device nodes, FIFOs and sockets are the guest's own (FUSE opens
            # them in the guest); reopening the host's would be a way out.
            raise FuseError(errno.EACCES)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if self.readonly and (writable or flags & os.O_TRUNC):
            raise FuseError(errno.EROFS)
        if self.readonly:
            # No OPEN or RELEASE for files from now on (the kernel's no_open): two
            # requests fewer for every file a program opens, which is most of the
            # traffic when commands start. READ then comes with file handle 0.
            raise FuseError(errno.ENOSYS)
        fd = os.open(node.proc_path, (flags & _PASSED_OPEN_FLAGS) | os.O_CLOEXEC)
        fh = self.handles.add(Handle(fd, node, writable))
        return p.OPEN_OUT.pack(fh, p.FOPEN_KEEP_CACHE if self.readonly else 0, 0)

    def _create(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        parent = self._directory(nodeid)
        flags, mode, _umask, _open_flags = args.take(p.CREATE_IN)
        name = args.name()
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise FuseError(errno.EINVAL)
        fd = os.open(name, (flags & _PASSED_OPEN_FLAGS) | (flags & os.O_EXCL) | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, stat.S_IMODE(mode) & _NO_PRIVILEGE_BITS, dir_fd=parent.fd)
        try:
            path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)  # the inode just opened
            st = os.fstat(path_fd)
        except OSError:
            os.close(fd)
            raise
        node = self.nodes.add_lookup(path_fd, st)
        fh = self.handles.add(Handle(fd, node, flags & os.O_ACCMODE != os.O_RDONLY))
        return self._entry_out(node.nodeid, st) + p.OPEN_OUT.pack(fh, 0, 0)

    def _file_fd(self, fh: int, nodeid: int) -> int:
        """The fd to read a file through: its handle's, or on a read-only share
        (which never opens handles for files) the node's own reader."""
        if fh == 0 and self.readonly:
            node = self._not_symlink(self.nodes.get(nodeid))
            if not stat.S_ISREG(node.mode):
                raise FuseError(errno.EACCES)
            if node.reader is None:
                node.reader = os.open(node.proc_path, os.O_RDONLY | os.O_CLOEXEC)
            return node.reader
        handle = self.handles.get(fh, nodeid)
        if handle.entries is not None:
            raise FuseError(errno.EISDIR)
        return handle.fd

    def _read(self, nodeid: int, args: Arguments) -> FileRange:
        fh, offset, size, *_ = args.take(p.READ_IN)
        fd = self._file_fd(fh, nodeid)
        if offset >= 1 << 63:
            raise FuseError(errno.EINVAL)
        return FileRange(fd, offset, min(size, MAX_TRANSFER))

    def _write(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        fh, offset, size, *_ = args.take(p.WRITE_IN)
        handle = self.handles.get(fh, nodeid)
        if not handle.writable:
            raise FuseError(errno.EBADF)
        if size > args.remaining or size > MAX_TRANSFER or offset >= 1 << 63:
            raise FuseError(errno.EINVAL)
        with args.request.views(args.offset, size) as buffers:
            written = os.pwritev(handle.fd, buffers, offset)
        return p.WRITE_OUT.pack(written, 0)

    def _statfs(self, nodeid: int, args: Arguments) -> bytes:
        st = os.fstatvfs(self.nodes.get(nodeid).fd)
        return p.STATFS_OUT.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                                 st.f_bsize, st.f_namemax, st.f_frsize, 0)

    def _release(self, nodeid: int, args: Arguments) -> None:
        fh, *_ = args.take(p.RELEASE_IN)
        self.handles.get(fh, nodeid)
        self.handles.release(fh)

    def _fsync(self, nodeid: int, args: Arguments) -> None:
        fh, flags, _ = args.take(p.FSYNC_IN)
        handle = self.handles.get(fh, nodeid)
        if not self.readonly:
            (os.fdatasync if flags & p.FSYNC_FDATASYNC else os.fsync)(handle.fd)

    def _access(self, nodeid: int, args: Arguments) -> None:
        node = self.nodes.get(nodeid)
        mask, _ = args.take(p.ACCESS_IN)
        if mask & os.W_OK and self.readonly:
            raise FuseError(errno.EROFS)
        if node.is_symlink:
            return  # a symlink's own permissions are never checked
        if not os.access(node.proc_path, mask & (os.R_OK | os.W_OK | os.X_OK)):
            raise FuseError(errno.EACCES)

    def _fallocate(self, nodeid: int, args: Arguments) -> None:
        self._writable()
        fh, offset, length, mode, _ = args.take(p.FALLOCATE_IN)
        handle = self.handles.get(fh, nodeid)
        if not handle.writable:
            raise FuseError(errno.EBADF)
        if mode & ~_FALLOCATE_MODES or offset >= 1 << 63 or length >= 1 << 63:
            raise FuseError(errno.EOPNOTSUPP)
        _check_libc(_libc.fallocate(handle.fd, mode, offset, length))

    def _lseek(self, nodeid: int, args: Arguments) -> bytes:
        fh, offset, whence, _ = args.take(p.LSEEK_IN)
        fd = self._file_fd(fh, nodeid)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE) or offset >= 1 << 63:
            raise FuseError(errno.EINVAL)
        return p.LSEEK_OUT.pack(os.lseek(fd, offset, whence))

    def _copy_file_range(self, nodeid: int, args: Arguments) -> bytes:
        self._writable()
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = args.take(p.COPY_FILE_RANGE_IN)
        source, target = self.handles.get(fh_in, nodeid), self.handles.get(fh_out, nodeid_out)
        if not target.writable or flags or off_in >= 1 << 63 or off_out >= 1 << 63:
            raise FuseError(errno.EINVAL)
        copied = os.copy_file_range(source.fd, target.fd, min(length, MAX_COPY), off_in, off_out)
        return p.WRITE_OUT.pack(copied, 0)

    # -- directories -------------------------------------------------------------------

    def _opendir(self, nodeid: int, args: Arguments) -> bytes:
        node = self._directory(nodeid)
        fd = os.open(node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = self.handles.add(Handle(fd, node, False, entries=[]))
        return p.OPEN_OUT.pack(fh, 0, 0)

    def _listing(self, handle: Handle, offset: int) -> list[tuple[bytes, int, int]]:
        """The directory's entries (name, inode, type), read afresh when the guest starts over."""
        if offset == 0 or not handle.entries:
            st = os.fstat(handle.fd)
            entries = [(b".", st.st_ino, stat.S_IFDIR >> 12), (b"..", st.st_ino, stat.S_IFDIR >> 12)]
            if handle.node.key not in self.hidden:
                with os.scandir(handle.fd) as scan:
                    for entry in scan:
                        entries.append((os.fsencode(entry.name), entry.inode(), _dirent_type(entry)))
            handle.entries = entries
        return handle.entries

    def _readdir(self, nodeid: int, args: Arguments) -> bytes:
        return self._directory_entries(nodeid, args, plus=False)

    def _readdirplus(self, nodeid: int, args: Arguments) -> bytes:
        return self._directory_entries(nodeid, args, plus=True)

    def _directory_entries(self, nodeid: int, args: Arguments, plus: bool) -> bytes:
        fh, offset, size, *_ = args.take(p.READ_IN)
        handle = self.handles.get(fh, nodeid)
        if handle.entries is None:
            raise FuseError(errno.ENOTDIR)
        entries = self._listing(handle, offset)
        size = min(size, MAX_TRANSFER)
        out, used = [], 0
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            record = p.dirent_size(len(name), plus)
            if used + record > size:
                break
            entry = b""
            if plus:
                # "." and ".." carry no node (the kernel takes no reference to them).
                entry = self._entry_out(0, None)
                if name not in (b".", b".."):
                    try:
                        entry = self._entry(handle.node, name)
                    except OSError:
                        pass  # gone since the listing: a plain entry, the guest looks it up
            dirent = p.DIRENT.pack(ino, index + 1, len(name), kind) + name
            out.append((entry + dirent).ljust(record, b"\0"))
            used += record
        return b"".join(out)


def _dirent_type(entry: os.DirEntry) -> int:
    """The entry's type as FUSE carries it (the S_IFMT bits >> 12, which are the DT_ values)."""
    try:
        if entry.is_symlink():
            return stat.S_IFLNK >> 12
        if entry.is_dir(follow_symlinks=False):
            return stat.S_IFDIR >> 12
        if entry.is_file(follow_symlinks=False):
            return stat.S_IFREG >> 12
    except OSError:
        pass
    return 0  # DT_UNKNOWN: the guest finds out with a lookup
