"""One machine per pyvmm process: `run_machine()` builds, runs and tears it down.

The machine being run is process-wide state: the signal handlers (vmm/cli.py)
and the console's Ctrl-A x find it through `current_machine()`.
"""

from __future__ import annotations

import time

from vmm import builder, exit_status
from vmm.config import MachineConfig
from vmm.console import Console
from vmm.errors import report, to_stderr
from vmm.lifecycle import StopController
from vmm.machine import Machine
from vmm.stats import stats_report

_current: Machine | None = None


def current_machine() -> Machine | None:
    """The machine being run, for signal handlers."""
    return _current


def stop_current(status: int, reason: str, *, by_host: bool) -> None:
    """Stop the machine being run, if any, with this status (any thread).

    `by_host`: the host asks (a signal, Ctrl-A x, an output that is gone), not the guest
    (`pyvmm run`'s command reporting its status, which may be 130 as well)."""
    machine = _current
    if machine is not None:
        machine.stop.request_stop(status, reason, by_host=by_host)
        if by_host:
            # Output nobody reads is not waited for, also when the guest had ended and its
            # last output was waiting for a reader.
            machine.console.discard_output()


def host_stops_current(status: int, reason: str) -> None:
    """`stop_current` for the host: a console's `quit` and `output_failed`, a signal handler."""
    stop_current(status, reason, by_host=True)


def run_machine(config: MachineConfig) -> int:
    """Build, run and tear down one machine; returns the exit status (vmm/exit_status.py)."""
    stop = run_machine_quietly(config)
    if stop.reason:
        report(stop.reason)
    return stop.status


def run_machine_quietly(config: MachineConfig, console: Console | None = None) -> StopController:
    """The same, printing nothing of its own (but --stats); returns how it stopped: the
    status, why, and whether the host asked.

    `console`: where the serial port goes (default: this terminal or pipe).
    """
    global _current
    started = time.monotonic()
    console = console or Console(quit=lambda: host_stops_current(exit_status.INTERRUPTED, "stopped by Ctrl-A x"),
                                 output_failed=host_stops_current)
    machine = _current = Machine(config, console)
    try:
        builder.build(machine)
        machine.run()
    finally:
        machine.shutdown()
        console.restore()
        _current = None
    if config.stats:
        to_stderr(stats_report(machine, time.monotonic() - started) + "\n")
    return machine.stop
