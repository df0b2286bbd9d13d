"""Software CPU: the stop hook's checks made in Unicorn's per-block exit check, with no block hook.

What they decide (stops, interrupt windows, NMI look-ahead) is tested through
guests in test_tcg_interrupt_windows.py, test_tcg_nmi.py, test_tcg_interrupts.py
and the kicks of test_tcg_real_mode.py, which all run on this path by default.
"""

from __future__ import annotations

import threading

from tests.unit.tcg_support import assemble
from vmm.tcg import exit_check_stop
from vmm.tcg.engine import Engine, x86


def test_the_pinned_unicorn_runs_the_stop_checks_without_a_block_hook(machine):
    assert machine.vm.engine.stop_hook.in_exit_check is True


def slots_in_use() -> int:
    table = exit_check_stop._table
    return sum(int.from_bytes(table[slot * exit_check_stop.SLOT_SIZE:][:8], "little") != 0
               for slot in range(exit_check_stop.SLOTS))


def test_a_closed_engine_gives_its_slot_back():
    Engine(measure_tsc=False).close()  # the library is patched by now
    before = slots_in_use()
    engine = Engine(measure_tsc=False)
    try:
        assert engine.stop_hook.in_exit_check
        assert slots_in_use() == before + 1
    finally:
        engine.close()
    assert slots_in_use() == before


def test_engines_alive_together_each_have_their_own_state():
    engines = [Engine(measure_tsc=False) for _ in range(3)]
    try:
        engines[1].stop_hook.request()
        assert [engine.stop_hook.requested for engine in engines] == [False, True, False]
    finally:
        for engine in engines:
            engine.close()


# A guest that never stops by itself: only the stop hook ends its slice.
SPIN = ".code16\n1: jmp 1b\n"


def test_a_request_made_before_the_slice_starts_stops_it_at_its_first_block(machine, tmp_path):
    machine.load(assemble(SPIN, tmp_path))
    engine, hook = machine.vm.engine, machine.vm.engine.stop_hook
    hook.clear()
    hook.request()  # as a timer or kick can, between the vCPU's clear() and emu_start
    slice_ = threading.Thread(target=lambda: engine.start(engine.reg(x86.UC_X86_REG_RIP)), daemon=True)
    slice_.start()
    slice_.join(10)
    stuck = slice_.is_alive()
    if stuck:
        hook.request()  # let the thread end; the request made first was lost
        slice_.join(5)
    assert not stuck
