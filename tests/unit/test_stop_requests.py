"""Who asked a machine to stop decides whether its last output is waited for, never the status.

A guest may end with any status, 124 and 130 included (the debug-exit port,
`pyvmm run`'s command): its last output waits for a slow reader as for any
other status. The host's stops (a signal, Ctrl-A x, --timeout) do not wait for
a reader. Machine.shutdown here runs with no vCPU thread and a console that
records what it was told.
"""

from __future__ import annotations

import pytest

from vmm import session
from vmm.config import MachineConfig
from vmm.exit_status import INTERRUPTED, POWEROFF, TIMED_OUT
from vmm.machine import Machine


class RecordingConsole:
    def __init__(self) -> None:
        self.discarded = False
        self.drained: bool | None = None
        self.notices: list[str] = []

    def discard_output(self) -> None:
        self.discarded = True

    def stop(self, *, drain: bool = False) -> None:
        self.drained = drain

    def notice(self, text: str) -> None:
        self.notices.append(text)


class VcpuInZeros:
    """A vCPU whose next instructions are all zero bytes, as after a flat guest's last `out`."""

    index = 0

    def code_at_rip(self) -> tuple[int, bytes]:
        return 0x10004, bytes(16)


@pytest.fixture
def machine(tmp_path, monkeypatch) -> Machine:
    image = tmp_path / "guest.bin"
    image.write_bytes(b"\xf4")
    machine = Machine(MachineConfig(flat=image), RecordingConsole())
    machine.vcpus = [VcpuInZeros()]
    monkeypatch.setattr(session, "_current", machine)
    return machine


@pytest.mark.parametrize("status", [POWEROFF, 42, TIMED_OUT, INTERRUPTED])
def test_a_guests_own_status_keeps_its_last_output_for_the_reader(machine, status):
    machine.stop.request_stop(status, "")  # the debug-exit port, as every guest stop: the guest's
    machine.shutdown()
    assert (machine.console.drained, machine.console.discarded) == (True, False)
    assert machine.console.notices == []  # a guest that chose 124 did not run out of time
    assert (machine.stop.status, machine.stop.by_host) == (status, False)


@pytest.mark.parametrize("status", [TIMED_OUT, INTERRUPTED])
def test_pyvmm_runs_command_exiting_with_124_or_130_is_a_guest_stop(machine, status):
    session.stop_current(status, "", by_host=False)  # vmm/run/runner.py's on_status
    machine.shutdown()
    assert machine.stop.status == status
    assert (machine.console.drained, machine.console.discarded) == (True, False)


def test_a_signal_does_not_wait_for_a_reader(machine):
    session.host_stops_current(INTERRUPTED, "stopped by SIGTERM")
    assert machine.console.discarded  # at once: a vCPU blocked writing to a full pipe sees the stop
    machine.shutdown()
    assert (machine.stop.status, machine.stop.reason, machine.stop.by_host) == (INTERRUPTED, "stopped by SIGTERM",
                                                                                 True)
    assert machine.console.drained is False


def test_a_signal_ends_the_wait_for_a_reader_after_the_guest_ended(machine):
    # `pyvmm boot ... | sleep 1000`, the guest having exited 130 itself, then Ctrl-C.
    machine.stop.request_stop(INTERRUPTED, "")
    session.host_stops_current(INTERRUPTED, "stopped by SIGINT")
    assert machine.console.discarded
    assert (machine.stop.reason, machine.stop.by_host) == ("", False)  # the first request's


def test_timeout_does_not_wait_for_a_reader_and_looks_for_a_stuck_vcpu(machine):
    machine.stop.request_stop(TIMED_OUT, "the guest was still running after --timeout 1 s; stopped it",
                              by_host=True)
    machine.shutdown()
    assert machine.console.drained is False
    assert machine.console.notices == ["vCPU 0 is executing an all-zero page (RIP 0x10004): the guest looks stuck"]


def test_a_machine_shut_down_before_any_stop_is_stopped_by_the_host(machine):
    # A build that failed, or an exception on the way: nothing of the guest's to wait for.
    machine.shutdown()
    assert (machine.stop.status, machine.stop.by_host) == (INTERRUPTED, True)
    assert machine.console.drained is False
