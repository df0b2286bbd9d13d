"""Watch guest stores to a page exactly while translated code comes from it.

QEMU watches stores to a RAM page only while translated code comes from it:
such stores take the slow path, which invalidates the code they overwrite,
and once no code is left on the page its stores go the fast way again.
Unicorn 2.1.4 replaces that rule (accel/tcg/cputlb.c, `notdirty_write`) by
one about the mapping the store went through: a store through an executable
mapping keeps the page watched for good, a store through a non-executable
one stops watching at once, code or not. The first costs speed: Linux maps
its whole image executable until `mark_rodata_ro()`, just before it starts
/init, so every store to the boot stack (init_stack), to .data and to .bss
took the slow path: about 22 million stores, a fifth of a software-CPU boot.
The second costs correctness: code rewritten through a non-executable alias
(module text, BPF programs, W^X toggling) kept running in its old version.

`patch_code_page_tracking()` restores QEMU's rule in the loaded library: a
store that reaches the watch in `notdirty_write`, through any mapping, looks
the page up in the translation's page table (`page_find`) and lets it go
only when no translated block starts or ends on it. When code is translated
from the page later, Unicorn watches it again (`tb_gen_code` calls
`tlb_reset_dirty_by_vaddr`), as it already does for non-executable pages;
and every TLB refill watches a page anew.

Watching a page again after a translation (`tlb_reset_dirty_by_vaddr`) scans
every entry of every TLB (up to thousands per MMU mode) for each block
translated; a Linux boot translates 150,000 blocks. The entries for a page can
only sit in the page's own slot of each TLB and in the 8-entry victim TLBs,
so the function is replaced by one that looks at just those, with the same
test for each entry.

One gap remains (Unicorn's, not the patch's): when a page first gets code,
only the mapping the code was translated through is watched again; another
mapping of the page whose stores were let go while it held no code stays
unwatched until its TLB entry is refilled (any CR3 write flushes them all).
Code written through a second writable mapping in between (a dual-mapped
JIT) can then run stale. QEMU re-watches every mapping by host address.

Each change is 5 bytes in the library's text, a jump to a small piece of
code mapped within reach of it. It is made only when the library's code is
byte for byte the one this was written against (SHA-256 of the functions
involved); otherwise, or when the host forbids it, nothing changes and
guests run slower, and code rewritten through a non-executable alias may run
stale as in unpatched Unicorn.
"""

from __future__ import annotations

import ctypes
import logging

from vmm.tcg.text_patch import OncePerProcess, jump, map_near, sha256
from vmm.tcg.unicorn_lib import uclib

log = logging.getLogger(__name__)

# Addresses in Unicorn 2.1.4's libunicorn.so.2 (the PyPI x86-64 Linux build),
# relative to the exported check_exit_request_x86_64.
NOTDIRTY_WRITE = 0x4132B0 - 0x40D200
NOTDIRTY_WRITE_SIZE = 0x358
NOTDIRTY_WRITE_SHA256 = "35cf1e309d575522d9db9cfe050c4b2e601a74350a24f555eb8a9e9e2d404ad5"
# tb_invalidate_phys_page_fast_x86_64 begins with an inlined page_find(): the
# same uc_struct offsets and PageDesc layout as the code below.
PAGE_FIND_PREFIX_SIZE = 0x80
PAGE_FIND_PREFIX_SHA256 = "eb151619c318140008d58225af4b1549ce2ec66f5e81487d037c8bc84555f4fb"
# In notdirty_write: `cmp qword [rbp + 0x10], -1; je set_dirty` (is the TLB
# entry's addr_code -1?), else fall through to `keep` (return, still watched).
PATCH_OFFSET = 0x6D
KEEP_OFFSET = 0x74
SET_DIRTY_OFFSET = 0xF0

# The replacement, entered by a jump from PATCH_OFFSET with notdirty_write's
# registers: rbp = the TLB entry, r9 = the MemoryRegion, r15 = the CPU, and
# [rsp + 0x10] = the page's ram_addr (stored there on the executable-region
# path). Only caller-saved registers are changed.
#
#     jmp   +9; 9 x nop                  ; was: addr_code == -1 -> dirty (Unicorn's
#                                        ;   rule for non-executable mappings)
#     test  byte [r9 + 0x88], 4          ; mr->perms & UC_PROT_EXEC, else
#     jz    keep                         ;   [rsp + 0x10] was not stored
#     mov   rdi, [r15 + 0x81a8]          ; cpu->uc
#     mov   rsi, [rsp + 0x10]            ; ram_addr
#     shr   rsi, 12                      ; page index
#     ... page_find(uc, index) as Unicorn inlines it: uc->l1_map (0x2e0),
#     ... v_l1_size (0x2f0), v_l1_shift (0x2f4), v_l2_levels (0x2f8), 10 bits
#     ... per level; a missing level means no code on the page -> dirty
#     cmp   qword [PageDesc + 0], 0      ; first_tb (PageDesc is 24 bytes)
#     je    dirty
#   keep:  jmp [rip + keep_target]
#   dirty: jmp [rip + dirty_target]
TRAMPOLINE = bytes.fromhex(
    "eb09909090909090909090" "41f6818800000004747a498bbfa8810000488b74241048c1ee0c"
    "8b87f00200008b8ff402000083e8014889f248d3ea48984821d0488b97e0020000488d14c2"
    "8b87f802000085c07e228d04808d0c00488b124885d274334889f048d3e825ff030000488d"
    "14c283e90a75e4488b124885d2741781e6ff030000488d047648833cc2007406ff25060000"
    "00ff2508000000"
)

# tlb_reset_dirty_by_vaddr_x86_64(cpu, start, length), exported.
RESET_DIRTY_SIZE = 0x1CB
RESET_DIRTY_SHA256 = "c85f429a40f9db6186ce63ebe530828897efc8df9a1e16a399a90f6df0c79c69"
# Its replacement: for each of the 3 MMU modes (CPUTLBDescFast {mask, table}
# at env - 0x40 + 0x10 * mode; the victim TLB's first addr_write at
# env - 0x838 + 0x2b8 * mode; env = cpu->env_ptr at cpu + 0x128), every page
# from `start` while page - start < length: the entry in slot
# ((page >> 12) << 6) & mask, then the 8 victim entries. Each entry gets
# TLB_NOTDIRTY (0x400) if its addr_write has none of 0xe40 set and its page
# lies in [start, start + length), as in the original.
#
#     push rbx;  r11 = env;  r10 = &fast[0];  r9 = &vtable[0].addr_write
#   mode: rcx = mask; rdx = table; rsi = start rounded up to a page
#   page: if page - start >= length: goto victims
#         WATCH(table + slot + 8); page += 4096; goto page
#   victims: WATCH(r9 + 0x40 * k) for k in 0..7
#         r9 += 0x2b8; r10 += 0x10; loop over the 3 modes;  pop rbx; ret
#   WATCH(p): rbx = [p]; if rbx & 0xe40: skip
#             if ((rbx & -4096) - start) < length: or qword [p], 0x400
RESET_DIRTY_REPLACEMENT = bytes.fromhex(
    "534c8b9f280100004d8d53c04d8d8bc8f7ffff4983eb104889d74989f0498b0a498b5208498d"
    "b0ff0f00004881e600f0ffff4889f04c29c04839c7763d4889f048c1e80c48c1e0064821c848"
    "8d440208488b18f7c3400e000075164881e300f0ffff4c29c34839df760748810800040000"
    "4881c600100000ebb84c89c8498d8900020000488b18f7c3400e000075164881e300f0ffff"
    "4c29c34839df7607488108000400004883c0404839c875d64981c1b80200004983c2104d39"
    "d90f855bffffff5bc3"
)


def _apply() -> bool:
    anchor = ctypes.cast(uclib.check_exit_request_x86_64, ctypes.c_void_p).value
    page_find = ctypes.cast(uclib.tb_invalidate_phys_page_fast_x86_64, ctypes.c_void_p).value
    reset_dirty = ctypes.cast(uclib.tlb_reset_dirty_by_vaddr_x86_64, ctypes.c_void_p).value
    function = anchor + NOTDIRTY_WRITE
    if (sha256(function, NOTDIRTY_WRITE_SIZE) != NOTDIRTY_WRITE_SHA256
            or sha256(page_find, PAGE_FIND_PREFIX_SIZE) != PAGE_FIND_PREFIX_SHA256
            or sha256(reset_dirty, RESET_DIRTY_SIZE) != RESET_DIRTY_SHA256):
        log.debug("software CPU: libunicorn is not the known 2.1.4 build; code-page tracking left as is")
        return False
    code = (TRAMPOLINE + (function + KEEP_OFFSET).to_bytes(8, "little")
            + (function + SET_DIRTY_OFFSET).to_bytes(8, "little"))
    # Both pieces of code are in place before either jump is written.
    trampoline = map_near(function, code)
    replacement = map_near(reset_dirty, RESET_DIRTY_REPLACEMENT)
    jump(reset_dirty, replacement)
    jump(function + PATCH_OFFSET, trampoline)
    return True


patch_code_page_tracking = OncePerProcess(_apply, "code-page tracking left as is")
