"""A catalog entry and the catalog as a mapping: the types every catalog reader builds,
kept apart from the readers so that the TOML and vendor CSV readers do not import each
other."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from shared.levels import Level

__all__ = ["Catalog", "CatalogEntry"]


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    module: str
    event_id: int
    level: Level
    mail: bool
    text: str
    action: str = ""
    description: str = ""
    # Other texts the same event has had (vendor lists repeat keys with variants).
    alternates: tuple[str, ...] = ()
    # The message as the cluster software writes it to its log, when our mail text says it
    # in other words: log followers match lines against this to recover the params.
    log_text: str = ""
    # The params that tell one incident of this kind from another (the worker merges
    # events with equal cluster, key and these params); None: all of them.
    identity: tuple[str, ...] | None = None
    # The ``module:event_id`` keys whose open incidents an event of this kind closes.
    resolves: tuple[str, ...] = ()

    @property
    def logged_texts(self) -> tuple[str, ...]:
        """What a log line of this kind may read, for the follower's match-back."""
        return (self.log_text,) if self.log_text else (self.text, *self.alternates)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.event_id}"


class Catalog(Mapping[tuple[str, int], CatalogEntry]):
    """Entries by ``(module, event_id)``."""

    def __init__(self, entries: Iterable[CatalogEntry] = ()):
        self._entries: dict[tuple[str, int], CatalogEntry] = {}
        for entry in entries:
            self._entries[(entry.module, entry.event_id)] = entry

    def __getitem__(self, key: tuple[str, int]) -> CatalogEntry:
        return self._entries[key]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, module: str, event_id: int) -> CatalogEntry | None:
        return self._entries.get((module, event_id))

    def layered(self, over: Catalog) -> Catalog:
        """This catalog with ``over``'s entries replacing or adding to it."""
        return Catalog([*self._entries.values(), *over._entries.values()])
