"""Event levels and their order. ``error`` outranks ``warning`` outranks ``info``."""

from __future__ import annotations

from typing import Final, Literal

__all__ = ["LEVELS", "Level", "level_rank"]

Level = Literal["info", "warning", "error"]
LEVELS: Final[tuple[Level, ...]] = ("info", "warning", "error")


def level_rank(level: Level) -> int:
    return LEVELS.index(level)
