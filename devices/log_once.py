"""Log a guest's misbehaviour once per kind, and count every occurrence.

A guest can write nonsense to a register millions of times; the VMM must
neither crash nor flood its log. Each model owns a `LogOnce` and reports odd
accesses through it: the first occurrence of each kind is logged at warning
level, later ones are only counted (the counts help when debugging a guest).
"""

from __future__ import annotations

import logging


class LogOnce:
    def __init__(self, logger: logging.Logger, prefix: str) -> None:
        self._logger = logger
        self._prefix = prefix
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        seen = self.counts.get(kind, 0)
        self.counts[kind] = seen + 1
        if seen == 0:
            self._logger.warning("%s: " + message, self._prefix, *args)
