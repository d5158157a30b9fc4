"""The filter decision: is this event mailed, and at what level? (README,
"Filter decision"). Pure and ordered exactly as the contract says, so it is easy to test."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from shared.catalog import Catalog, CatalogEntry
from shared.config import FilterConfig
from shared.event import Event
from shared.levels import Level, level_rank

__all__ = ["FILTER_REASONS", "Decision", "decide"]

FilterReason = Literal["disabled", "catalog", "min_level", "unknown"]
FILTER_REASONS: tuple[FilterReason, ...] = ("disabled", "catalog", "min_level", "unknown")


@dataclass(frozen=True, slots=True)
class Decision:
    mail: bool
    level: Level
    entry: CatalogEntry | None
    # Why it is not mailed; None when mailed.
    reason: FilterReason | None
    # Human-readable explanation, for logs and ``catalog show``.
    why: str


def _matches(key: str, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if fnmatchcase(key, pattern):
            return pattern
    return None


def decide(event: Event, catalog: Catalog, config: FilterConfig) -> Decision:
    entry = catalog.lookup(event.module, event.event_id)
    # The catalog's level wins over the event's; an event with neither counts as info.
    level: Level = entry.level if entry else (event.level or "info")
    key = event.key
    pattern = _matches(key, config.disable)
    if pattern is not None:
        return Decision(False, level, entry, "disabled", f"{key} matches disable {pattern!r}")
    pattern = _matches(key, config.enable)
    if pattern is not None:
        return Decision(True, level, entry, None, f"{key} matches enable {pattern!r}")
    if entry is not None:
        if not entry.mail:
            return Decision(False, level, entry, "catalog", f"catalog has mail off for {key}")
        if level_rank(level) < level_rank(config.min_level):
            return Decision(
                False,
                level,
                entry,
                "min_level",
                f"level {level} is below min_level {config.min_level}",
            )
        return Decision(True, level, entry, None, f"catalog mails {key} at {level}")
    if config.unknown != "never" and level_rank(level) >= level_rank(config.unknown):
        return Decision(
            True,
            level,
            None,
            None,
            f"{key} is not in the catalog; its level {level} meets the "
            f"unknown-event policy ({config.unknown})",
        )
    return Decision(
        False,
        level,
        None,
        "unknown",
        f"{key} is not in the catalog; level {level} is below the unknown-event "
        f"policy ({config.unknown})",
    )
