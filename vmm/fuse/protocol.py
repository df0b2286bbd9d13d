"""The FUSE wire format (include/uapi/linux/fuse.h), the part pyvmm's server speaks.

Every message starts with a header; the operation's arguments follow it.

    request   fuse_in_header  {len u32, opcode u32, unique u64, nodeid u64,
                               uid u32, gid u32, pid u32, total_extlen u16, padding u16}
    reply     fuse_out_header {len u32, error i32 (0 or -errno), unique u64}

All integers are little-endian on x86. Structures are named as in fuse.h.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
# The newest minor version whose structures this server knows; Linux 6.1
# speaks 7.37 and falls back to what the server answers in INIT.
KERNEL_MINOR_VERSION = 31
ROOT_ID = 1

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")

# struct fuse_attr: ino size blocks atime mtime ctime, atimensec mtimensec ctimensec
# mode nlink uid gid rdev blksize flags.
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# struct fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
# struct fuse_attr_out: attr_valid attr_valid_nsec dummy attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
# struct fuse_kstatfs: blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 from 7.36)
# struct fuse_init_out: major minor max_readahead flags max_background congestion_threshold
# max_write time_gran max_pages map_alignment flags2 unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
# struct fuse_setattr_in: valid padding fh size lock_owner atime mtime ctime atimensec
# mtimensec ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
ACCESS_IN = struct.Struct("<II")  # mask padding
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("<Q")
# struct fuse_copy_file_range_in: fh_in off_in nodeid_out fh_out off_out len flags
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name, padded to 8 bytes

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50

IOCTL = 39
POLL = 40
# Operations the server does without: ENOSYS makes the kernel stop sending them.
# FLUSH: nothing is buffered in the server, and POSIX locks are the guest's own.
UNSUPPORTED = frozenset({SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, IOCTL, POLL, SYNCFS, FLUSH})
# Operations the kernel sends without waiting for a reply.
NO_REPLY = frozenset({FORGET, BATCH_FORGET})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags).
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23

# setattr valid bits (FATTR_*).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

FOPEN_KEEP_CACHE = 1 << 1
FSYNC_FDATASYNC = 1 << 0
GETATTR_FH = 1 << 0


def dirent_size(name_length: int, plus: bool) -> int:
    """Bytes a directory entry takes in a READDIR(PLUS) reply: 8-byte aligned."""
    size = (ENTRY_OUT.size if plus else 0) + DIRENT.size + name_length
    return (size + 7) & ~7
