"""Software-CPU engine set-up: Unicorn's per-access exit checks are off, guest code still behaves."""

from __future__ import annotations

import pytest

from tests.unit.tcg_support import TcgMachine, assemble


@pytest.fixture
def machine():
    m = TcgMachine()
    yield m
    m.close()


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
