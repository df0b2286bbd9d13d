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


def slot_of(engine: Engine) -> int:
    table, handle = exit_check_stop._table, engine.stop_hook._slot._engine.value
    return next(slot for slot in range(exit_check_stop.SLOTS)
                if int.from_bytes(table[slot * exit_check_stop.SLOT_SIZE:][:8], "little") == handle)


def test_a_request_from_another_thread_stops_an_engine_in_any_slot():
    """The exit check looks at the table's first slot before it searches the others
    (exit_check_stop.py): a spinning engine found there, or further on, stops."""
    engines = [Engine(measure_tsc=False) for _ in range(2)]
    try:
        assert slot_of(engines[1]) > slot_of(engines[0])
        for engine in engines:
            engine.uc.mem_map(0x10000, 0x1000)
            engine.uc.mem_write(0x10000, bytes.fromhex("eb fe"))  # 1: jmp 1b
            timer = threading.Timer(0.2, engine.stop_hook.request)
            timer.start()
            slice_ = threading.Thread(target=engine.start, args=(0x10000,), daemon=True)
            slice_.start()
            slice_.join(10)
            stuck = slice_.is_alive()
            if stuck:
                engine.uc.emu_stop()  # let the thread end
                slice_.join(5)
            timer.join()
            assert not stuck, f"the engine in slot {slot_of(engine)} did not stop"
            assert engine.reg(x86.UC_X86_REG_RIP) == 0x10000
    finally:
        for engine in engines:
            engine.close()
