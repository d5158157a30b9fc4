"""Exponential backoff with jitter, for reconnect loops: each wait doubles up to a
ceiling, and is drawn between half of it and all of it so that many clients cut off at
once do not come back in step."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(self, first: float, ceiling: float):
        self.first = first
        self.ceiling = ceiling
        self._next = first

    def reset(self) -> None:
        """After a success: the next failure waits the shortest time again."""
        self._next = self.first

    def delay(self) -> float:
        """The wait before the next attempt; each call doubles the one after."""
        delay = self._next * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrets
        self._next = min(self._next * 2, self.ceiling)
        return delay
