"""What every fuzz test shares: seeded and short in the suite, long on demand (`make fuzz`).

In the suite (and CI) each fuzz test runs a fixed number of cases from a fixed
seed, so a run repeats exactly and takes seconds. `make fuzz` hunts:

    PYVMM_FUZZ_EXAMPLES=N   cases per fuzz test (hypothesis examples, or mutated inputs)
    PYVMM_FUZZ_SEED=S       the seed of the mutation fuzzers (a failure names its seed and case)

A hypothesis test takes its settings from `fuzz_settings`; with
PYVMM_FUZZ_EXAMPLES set it also stops being derandomised, so every hunt
explores new inputs (hypothesis prints how to reproduce what it finds).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

HUNT_EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "0"))
SEED = int(os.environ.get("PYVMM_FUZZ_SEED", "12"))


def fuzz_settings(suite_examples: int) -> settings:
    return settings(max_examples=HUNT_EXAMPLES or suite_examples, deadline=None, derandomize=not HUNT_EXAMPLES,
                    database=None, suppress_health_check=list(HealthCheck))


def fuzz_cases(name: str, suite_cases: int) -> Iterator[tuple[str, random.Random]]:
    """(label, random generator) per case; the label says how to replay the case."""
    for case in range(HUNT_EXAMPLES or suite_cases):
        yield f"{name} case {case} (PYVMM_FUZZ_SEED={SEED})", random.Random(f"{SEED}:{name}:{case}")


class Hang(Exception):
    """A fuzz case ran past its time bound."""


@contextmanager
def time_bound(seconds: float, label: str) -> Iterator[None]:
    """Raise `Hang` in the (main) thread if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise Hang(f"{label}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
