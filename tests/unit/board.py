"""A devices.board.Board for tests: fresh buses, no interrupt controllers, calls recorded."""

from __future__ import annotations

from devices.board import Board
from vmm.bus import Bus, NullIrqLine
from vmm.memory import GuestMemory


def make_board(memory: GuestMemory, cpus: int = 1) -> Board:
    """A board whose stops and console output are recorded in `board.stops` / `board.output`."""
    stops: list[tuple[int, str]] = []
    output = bytearray()
    board = Board(pio=Bus("pio"), mmio=Bus("mmio"), memory=memory, cpus=cpus,
                  irq=lambda gsi: NullIrqLine(), stop=lambda status, reason: stops.append((status, reason)),
                  reset=lambda reason: stops.append(("reset", reason)),
                  console_write=output.extend, console_room_available=lambda: None, started=0.0)
    board.stops = stops
    board.output = output
    return board
