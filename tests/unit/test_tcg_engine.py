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
