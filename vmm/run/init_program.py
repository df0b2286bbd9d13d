"""The guest's /init for `pyvmm run`: a static x86-64 program that pyvmm writes itself.

Nothing in the initramfs can be borrowed from the host (busybox or a static
shell are not on every host, and the host's own binaries need its root
filesystem, which is not mounted yet), so pyvmm emits the machine code of a
straight-line program: a list of system calls with constant arguments,
written for one run. It

    loads each kernel module                     open + finit_module
    mounts the host's root (virtio-fs) on /root  and makes it /: chdir, mount MS_MOVE, chroot
    mounts what the guest has of its own         proc, sysfs, devtmpfs, devpts, tmpfs on /tmp, /run, ...
    mounts the run's other shares                the stdio share, --rw directories
    execs the host's /bin/sh                     with the command's arguments and environment

A step that must work and fails writes `pyvmm-init: <what failed> (errno N)`
on the console and powers the guest off, which pyvmm reports (status 125).
Every argument is a constant: strings live in the program's data, placed
before the code at addresses known when the code is emitted.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

BASE = 0x40_0000  # where the single PT_LOAD segment is mapped
_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_HEADERS = _ELF_HEADER.size + _PROGRAM_HEADER.size

# x86-64 system call numbers.
SYS_WRITE = 1
SYS_OPEN = 2
SYS_CLOSE = 3
SYS_IOCTL = 16
SYS_EXECVE = 59
SYS_CHDIR = 80
SYS_CHMOD = 90
SYS_MKDIR = 83
SYS_CHROOT = 161
SYS_MOUNT = 165
SYS_REBOOT = 169
SYS_FINIT_MODULE = 313
SYS_EXIT = 60

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_MOVE = 8192
EEXIST = 17
O_CLOEXEC = 0o2000000
TCSBRK = 0x5409  # with argument 1: tcdrain()
_REBOOT_MAGIC = (0xFEE1DEAD, 672274793, 0x4321FEDC)  # LINUX_REBOOT_MAGIC1, MAGIC2, CMD_POWER_OFF
# The registers of the first four arguments, as the REX.W B8+r "mov r64, imm64" opcodes.
_ARGUMENT_REGISTERS = (b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8")


@dataclass
class _Assembler:
    data: bytearray = field(default_factory=bytearray)
    code: bytearray = field(default_factory=bytearray)
    strings: dict[bytes, int] = field(default_factory=dict)
    fixups: list[tuple[int, str]] = field(default_factory=list)  # (rel32 position, label)
    labels: dict[str, int] = field(default_factory=dict)

    # Data is laid out first (its addresses go into the code as constants).

    def string(self, text: bytes) -> int:
        if text not in self.strings:
            self.strings[text] = self._put(text + b"\0")
        return self.strings[text]

    def pointer_array(self, items: list[bytes]) -> int:
        pointers = [self.string(item) for item in items] + [0]
        self.data += bytes(-len(self.data) % 8)
        return self._put(b"".join(struct.pack("<Q", p) for p in pointers))

    def _put(self, blob: bytes) -> int:
        address = BASE + _HEADERS + len(self.data)
        self.data += blob
        return address

    # Code.

    def syscall(self, number: int, *args: int, first: int = 0) -> None:
        """A system call with constant arguments from argument number `first` on
        (the arguments before it are already in their registers)."""
        for register, value in zip(_ARGUMENT_REGISTERS[first:], args, strict=False):
            self.code += register + struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF)
        self.code += b"\xb8" + struct.pack("<I", number) + b"\x0f\x05"  # mov eax, imm32; syscall

    def keep_result(self) -> None:
        self.code += b"\x49\x89\xc4"  # mov r12, rax

    def result_as_first_argument(self) -> None:
        self.code += b"\x4c\x89\xe7"  # mov rdi, r12

    def jump_if_negative(self, label: str) -> None:
        self.code += b"\x48\x85\xc0\x0f\x88"  # test rax, rax; js rel32
        self._fixup(label)

    def jump_if_equal(self, value: int, label: str) -> None:
        self.code += b"\x48\x83\xf8" + struct.pack("<b", value) + b"\x0f\x84"  # cmp rax, imm8; je rel32
        self._fixup(label)

    def jump(self, label: str) -> None:
        self.code += b"\xe9"
        self._fixup(label)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def _fixup(self, label: str) -> None:
        self.fixups.append((len(self.code), label))
        self.code += b"\0\0\0\0"

    def link(self) -> bytes:
        for position, label in self.fixups:
            struct.pack_into("<i", self.code, position, self.labels[label] - (position + 4))
        self.data += bytes(-len(self.data) % 16)
        entry = BASE + _HEADERS + len(self.data)
        size = _HEADERS + len(self.data) + len(self.code)
        ident = b"\x7fELF\x02\x01\x01" + bytes(9)
        header = _ELF_HEADER.pack(ident, 2, 62, 1, entry, _ELF_HEADER.size, 0, 0, _ELF_HEADER.size,
                                  _PROGRAM_HEADER.size, 1, 64, 0, 0)
        segment = _PROGRAM_HEADER.pack(1, 7, 0, BASE, BASE, size, size, 0x1000)  # PT_LOAD, RWX
        return header + segment + bytes(self.data) + bytes(self.code)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    flags: int = 0
    options: str = ""
    required: bool = True
    make_target: bool = False  # mkdir the target and its parents first (where it may not exist)
    # Other directories to make first, with their modes (an overlay's upper and work directories).
    make_first: tuple[tuple[str, int], ...] = ()


@dataclass
class InitProgram:
    """What /init does, in order; `build()` gives the ELF executable."""

    modules: list[str] = field(default_factory=list)  # paths in the initramfs
    root: Mount | None = None  # mounted on /root, which then becomes /
    mounts: list[Mount] = field(default_factory=list)  # after the switch to the new root
    argv: list[bytes] = field(default_factory=list)
    env: list[bytes] = field(default_factory=list)

    def build(self) -> bytes:
        asm = _Assembler()
        failures: list[tuple[str, bytes]] = []

        def fail(what: str) -> str:
            label = f"fail{len(failures)}"
            failures.append((label, os.fsencode(f"pyvmm-init: {what}")))
            return label

        def make_directory(path: str) -> None:
            parts = path.strip("/").split("/")
            for depth in range(1, len(parts) + 1):
                asm.syscall(SYS_MKDIR, asm.string(os.fsencode("/" + "/".join(parts[:depth]))), 0o755)

        def mount(m: Mount, target: str) -> None:
            for path, mode in m.make_first:
                make_directory(path)
                asm.syscall(SYS_CHMOD, asm.string(os.fsencode(path)), mode)  # mkdir's mode is masked by the umask
            if m.make_target:
                make_directory(target)
            options = asm.string(m.options.encode()) if m.options else 0
            asm.syscall(SYS_MOUNT, asm.string(os.fsencode(m.source)), asm.string(os.fsencode(target)),
                        asm.string(m.fstype.encode()), m.flags, options)
            if m.required:
                asm.jump_if_negative(fail(f"cannot mount {m.source} ({m.fstype}) on {target}"))

        for number, path in enumerate(self.modules):
            asm.syscall(SYS_OPEN, asm.string(os.fsencode(path)), O_CLOEXEC, 0)
            asm.jump_if_negative(fail(f"cannot open {path}"))
            asm.keep_result()
            asm.result_as_first_argument()
            asm.syscall(SYS_FINIT_MODULE, asm.string(b""), 0, first=1)
            done = f"loaded{number}"
            asm.jump_if_equal(-EEXIST, done)
            asm.jump_if_negative(fail(f"cannot load {path}"))
            asm.label(done)
            asm.result_as_first_argument()
            asm.syscall(SYS_CLOSE)
        if self.root is not None:
            mount(self.root, "/root")
            asm.syscall(SYS_CHDIR, asm.string(b"/root"))
            asm.syscall(SYS_MOUNT, asm.string(b"."), asm.string(b"/"), 0, MS_MOVE, 0)
            asm.jump_if_negative(fail("cannot move the new root to /"))
            asm.syscall(SYS_CHROOT, asm.string(b"."))
            asm.jump_if_negative(fail("cannot chroot into the new root"))
            asm.syscall(SYS_CHDIR, asm.string(b"/"))
        for m in self.mounts:
            mount(m, m.target)
        argv = asm.pointer_array(self.argv)
        envp = asm.pointer_array(self.env)
        asm.syscall(SYS_EXECVE, asm.string(self.argv[0]), argv, envp)
        asm.jump(fail(f"cannot run {self.argv[0].decode(errors='replace')}"))
        for label, message in failures:
            asm.label(label)
            self._report(asm, message)
        return asm.link()

    @staticmethod
    def _report(asm: _Assembler, message: bytes) -> None:
        """Print the message (with the errno in rax) and power off; exit (a panic) if that fails."""
        # The errno is -rax; printing it takes a few instructions: negate, then
        # up to three decimal digits into a buffer in the data area.
        buffer = asm.string(b"   ")
        asm.code += b"\x48\xf7\xd8"  # neg rax
        asm.code += b"\x48\x89\xc1"  # mov rcx, rax (the errno)
        asm.code += b"\x48\xbf" + struct.pack("<Q", buffer + 2)  # mov rdi, buffer+2
        asm.code += b"\xbe\x0a\x00\x00\x00"  # mov esi, 10
        for _ in range(3):
            asm.code += b"\x48\x89\xc8"  # mov rax, rcx
            asm.code += b"\x31\xd2"  # xor edx, edx
            asm.code += b"\x48\xf7\xf6"  # div rsi
            asm.code += b"\x48\x89\xc1"  # mov rcx, rax (the quotient)
            asm.code += b"\x80\xc2\x30"  # add dl, '0'
            asm.code += b"\x88\x17"  # mov [rdi], dl
            asm.code += b"\x48\xff\xcf"  # dec rdi
        line = asm.string(message + b" (errno ")
        asm.syscall(SYS_WRITE, 2, line, len(message) + 8)
        asm.syscall(SYS_WRITE, 2, buffer, 3)
        asm.syscall(SYS_WRITE, 2, asm.string(b")\n"), 2)
        # The console (a serial port) sends what was written from interrupts,
        # later: wait until it has, or the power-off cuts the message short.
        asm.syscall(SYS_IOCTL, 2, TCSBRK, 1)
        asm.syscall(SYS_REBOOT, *_REBOOT_MAGIC, 0)
        asm.syscall(SYS_EXIT, 1)  # exit(1): the kernel panics, which ends the run too
