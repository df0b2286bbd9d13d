"""Software-CPU engine set-up: Unicorn's per-access exit checks are off, guest code still behaves."""

from __future__ import annotations

from tests.unit.tcg_support import assemble
from vmm.tcg import engine


def test_the_pinned_unicorn_lets_the_per_access_exit_checks_be_skipped(machine):
    assert machine.vm.engine.per_access_exit_checks is False


# A store into the very block that is running must still be seen by the next
# instruction: the stores that no longer check for exits still invalidate code.
SELF_MODIFYING = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    movb $0x42, patch + 1
patch:
    mov $0x41, %al
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
"""


def test_a_store_into_the_running_block_changes_what_runs_next(machine, tmp_path):
    machine.load(assemble(SELF_MODIFYING, tmp_path))
    machine.run()
    assert machine.exit.status == 0x2A
    assert bytes(machine.output.data) == b"B"


def test_the_pinned_unicorn_gets_its_code_page_tracking_patched(machine):
    assert machine.vm.engine.code_page_tracking_patched is True


# Real mode runs with every page executable. The buffer page first takes plain
# data stores (it holds no code, so its stores stop being watched), then code
# is written there and called, then that code is changed and called again:
# the second call must run the new code.
CODE_WRITTEN_INTO_A_DATA_PAGE = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    mov $64, %cx
1:  movw %cx, buffer + 16
    loop 1b
    movb $0xb0, buffer
    movb $0x41, buffer + 1
    movb $0xc3, buffer + 2
    call buffer
    out %al, $0xe9
    movb $0x42, buffer + 1
    call buffer
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
    .balign 4096
buffer:
    .fill 32, 1, 0
"""


def test_code_written_into_a_page_of_data_is_watched_once_it_runs(machine, tmp_path):
    machine.load(assemble(CODE_WRITTEN_INTO_A_DATA_PAGE, tmp_path))
    machine.run()
    assert machine.exit.status == 0x2A
    assert bytes(machine.output.data) == b"AB"


# Two routines on one page, both translated; changing the first leaves the
# page with translated code, so the change to the second must be seen too.
TWO_ROUTINES_CHANGED_IN_TURN = """
    .code16
    mov %cs, %ax
    mov %ax, %ds
    call first
    call second
    movb $0x43, first + 1
    movb $0x44, second + 1
    call first
    out %al, $0xe9
    call second
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
    .balign 4096
first:
    mov $0x41, %al
    ret
second:
    mov $0x42, %al
    ret
"""


def test_a_page_stays_watched_while_translated_code_is_left_on_it(machine, tmp_path):
    machine.load(assemble(TWO_ROUTINES_CHANGED_IN_TURN, tmp_path))
    machine.run()
    assert machine.exit.status == 0x2A
    assert bytes(machine.output.data) == b"CD"


# Linux writes code through one mapping and runs it through another: module
# text and BPF programs through non-executable aliases, page-cache pages
# through the direct map, user JITs by toggling W^X. The code page lies at
# 0x30000; the 3rd GiB maps the first one again, non-executable. The first
# store through the alias touches another byte of the page (no code there);
# the second rewrites `mov $1, %eax` into `mov $2, %eax`.
CODE_REWRITTEN_THROUGH_A_NON_EXECUTABLE_ALIAS = """
    .code64
    mov $0x30000, %r12
    call *%r12
    add $'0', %al
    out %al, $0xe9
    movabs $0x80030800, %rdi
    movb $0x90, (%rdi)
    movb $2, -0x7ff(%rdi)
    cpuid
    call *%r12
    add $'0', %al
    out %al, $0xe9
    mov $0x2a, %al
    out %al, $0xf4
    hlt
"""


def test_code_rewritten_through_a_non_executable_alias_is_not_run_stale(machine, tmp_path):
    from tests.unit.tcg_support import LOAD_ADDRESS, PDPT, long_mode_state

    memory = machine.memory
    memory.write(0x30000, bytes.fromhex("b801000000c3"))  # mov $1, %eax; ret
    state = long_mode_state(memory, LOAD_ADDRESS)
    state.efer |= 1 << 11  # NXE
    non_executable_pd = 0xC000
    for i in range(512):
        memory.write_u64(non_executable_pd + 8 * i, (i << 21) | 0x83 | (1 << 63))
    memory.write_u64(PDPT + 8 * 2, non_executable_pd | 0x7)
    memory.write(LOAD_ADDRESS, assemble(CODE_REWRITTEN_THROUGH_A_NON_EXECUTABLE_ALIAS, tmp_path,
                                        link_address=LOAD_ADDRESS))
    machine.vcpus[0].set_state(state)
    machine.run()
    assert machine.exit.status == 0x2A
    assert bytes(machine.output.data) == b"12"


# The rate pyvmm tells the guest (CPUID 0x15) is measured on the host's counter, read
# directly: it must be the very counter the guest's RDTSC reads.
RDTSC = """
    .code16
    rdtsc
    hlt
"""


def test_the_counter_measured_on_the_host_is_the_one_the_guest_reads(machine, tmp_path):
    rdtsc = engine.host_rdtsc()
    assert rdtsc is not None  # an x86-64 host that allows executable mappings
    machine.load(assemble(RDTSC, tmp_path))
    before = rdtsc()
    machine.run()
    after = rdtsc()
    registers = machine.vcpus[0].registers()
    guest = (registers["rdx"] & 0xFFFFFFFF) << 32 | registers["rax"] & 0xFFFFFFFF
    assert before < guest < after


def test_without_the_direct_read_the_engine_measures_the_same_rate(monkeypatch):
    direct = engine.Engine()
    try:
        direct_hz = direct.tsc_hz
    finally:
        direct.close()
    monkeypatch.setattr(engine, "host_rdtsc", lambda: None)
    monkeypatch.setattr(engine.Engine, "_tsc_hz_cache", None)
    through_the_engine = engine.Engine()
    try:
        assert abs(through_the_engine.tsc_hz - direct_hz) < direct_hz / 100
    finally:
        through_the_engine.close()
