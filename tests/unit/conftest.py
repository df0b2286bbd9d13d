"""Fixtures shared by the unit tests."""

import pytest


@pytest.fixture
def machine():
    """A software-CPU VM for a test guest (tests/unit/tcg_support.py), closed afterwards."""
    from tests.unit.tcg_support import TcgMachine  # Unicorn is loaded only by the tests that ask

    m = TcgMachine()
    yield m
    m.close()
