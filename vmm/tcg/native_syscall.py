"""SYSCALL in 64-bit mode done by machine code inside the engine, not by Python.

Unicorn 2.1.4 replaced QEMU's `helper_syscall` by one that only calls the
`UC_HOOK_INSN` hooks and advances RIP, so pyvmm performed the instruction in
Python (vmm/tcg/syscall.py): about 70 us per system call, a twentieth of a
shell-heavy guest's time and most of the cost of a guest writing to its
console. This module puts QEMU's own semantics back for the case every
64-bit kernel uses (EFER.SCE set, long mode active), as QEMU's softmmu
`helper_syscall` does it:

    RCX <- RIP of the next instruction;  R11 <- RFLAGS & ~RF
    RFLAGS <- RFLAGS & ~(SFMASK | RF)
    CS <- STAR[47:32] & ~3, flat 64-bit code, DPL 0
    SS <- STAR[47:32] + 8, flat data, DPL 0;  the CPL, CS64, CS32, SS32
          and ADDSEG translation flags follow, as cpu_x86_load_seg_cache
          keeps them
    RIP <- LSTAR (CSTAR when called from compatibility mode)

The arithmetic flags live in QEMU's lazy condition codes (CC_OP, CC_SRC...):
RFLAGS is computed with the library's `cpu_cc_compute_all`, and the masked
value stored back the way `cpu_load_eflags` does (CC_SRC holds the flags,
CC_OP = CC_OP_EFLAGS, DF in `df`). Unlike QEMU 5, whose helper takes the
arithmetic flags from `env->eflags` (where TCG keeps none) and so clears them,
the flags SFMASK does not name survive, as the SDM says.

With SCE clear (#UD) or outside long mode, the original Unicorn function runs
and the Python hook (vmm/tcg/syscall.py) does the work, as before.

The change is one jump at the entry of `helper_syscall_x86_64`, whose first
two instructions (`push r15; mov r15, rdi`, 5 bytes) the replacement repeats
before it jumps back; it is made once per process, only when the function is
byte for byte the known 2.1.4 build (vmm/tcg/text_patch.py).
"""

from __future__ import annotations

import ctypes
import logging

from vmm.tcg.text_patch import OncePerProcess, jump, map_near, sha256
from vmm.tcg.unicorn_lib import uclib

log = logging.getLogger(__name__)

HELPER_SYSCALL_SIZE = 0xF7
HELPER_SYSCALL_SHA256 = "ad02c020d0351094c13b062cb90c2b7ea57a44aea96175a7cf292f08fd8ded78"
ENTRY_SIZE = 5  # push r15; mov r15, rdi

# Assembled from (Intel syntax; rdi = env, esi = the instruction's length;
# offsets are CPUX86State's, as in vmm/tcg/qemu_env.py):
#
#     test byte [rdi+592], 1;  jz original       ; EFER.SCE
#     test dword [rdi+176], 0x4000;  jz original ; hflags & HF_LMA
#     push rbx; push r12; push r13
#     mov rbx, rdi;  movsxd r12, esi
#     mov esi, [rbx+168];  call [cc_compute_all] ; eax = arithmetic flags
#     rcx = [rbx+136] | eax | ([rbx+172] & 0x400)         ; RFLAGS
#     [rbx+8] = [rbx+128] + r12                            ; RCX = next RIP
#     [rbx+88] = rcx & ~RF                                 ; R11
#     rcx &= ~([rbx+4856] | RF)                            ; SFMASK
#     [rbx+152] = rcx & 0x8d5;  dword [rbx+168] = 1        ; CC_SRC, CC_OP_EFLAGS
#     dword [rbx+172] = (rcx & 0x400) ? -1 : 1             ; df
#     [rbx+136] = rcx & ~0xcd5 | 2                         ; eflags
#     r13d = [rbx+176]                                     ; hflags
#     eax = ([rbx+4824] >> 32) & 0xfffc                    ; STAR[47:32]
#     CS (rbx+208) = {eax, base 0, limit -1, flags 0xa09b00}
#     SS (rbx+232) = {(eax + 8) & 0xfffc, base 0, limit -1, flags 0xc09300}
#     dword [rbx+176] = (r13d | 0x8030) & ~0x43            ; CS64 CS32 SS32, CPL 0, no ADDSEG
#     [rbx+128] = r13d & 0x8000 ? [rbx+4840] : [rbx+4848]  ; LSTAR or CSTAR
#     dword [rbx+5496] = -1                                ; no exception in flight
#     pop r13; pop r12; pop rbx; ret
#   original:
#     push r15; mov r15, rdi;  jmp [resume]
#     (8-byte aligned) cc_compute_all: dq 0;  resume: dq 0
REPLACEMENT = bytes.fromhex(
    "f68750020000010f8457010000f787b0000000004000000f844701000053415441554889fb4c"
    "63e68bb3a8000000ff153c010000488b8b880000004809c18b93ac00000081e2000400004809"
    "d1488b83800000004c01e0488943084889c8480fbaf01048894358488b93f8120000480fbaea"
    "1048f7d24821d14889c825d508000048898398000000c783a800000001000000b801000000ba"
    "fffffffff7c1000400000f45c28983ac0000004881e12af3ffff4883c90248898b8800000044"
    "8babb0000000488b83d812000048c1e82025fcff00008983d000000048c783d8000000000000"
    "00c783e0000000ffffffffc783e4000000009ba00083c00825fcff00008983e800000048c783"
    "f000000000000000c783f8000000ffffffffc783fc0000000093c0004489e80d3080000083e0"
    "bc8983b0000000488b83e812000041f7c500800000480f4483f012000048898380000000c783"
    "78150000ffffffff415d415c5bc341574989ffff250900000090"
)

def _apply() -> bool:
    helper = ctypes.cast(uclib.helper_syscall_x86_64, ctypes.c_void_p).value
    if sha256(helper, HELPER_SYSCALL_SIZE) != HELPER_SYSCALL_SHA256:
        log.debug("software CPU: libunicorn is not the known 2.1.4 build; SYSCALL left to Python")
        return False
    compute_flags = ctypes.cast(uclib.cpu_cc_compute_all_x86_64, ctypes.c_void_p).value
    code = REPLACEMENT + compute_flags.to_bytes(8, "little") + (helper + ENTRY_SIZE).to_bytes(8, "little")
    jump(helper, map_near(helper, code))
    return True


patch_syscall = OncePerProcess(_apply, "SYSCALL left to Python")
