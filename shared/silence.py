"""Silences (README, "Silences"): what they are, the records that store them in the
``clusteralert.silences`` stream, and the book every worker folds those records into.

Pure: no broker, no clock of its own. The stream is append-only, so a silence is never
edited: an ``add`` record starts it, an ``expire`` record or its end time stops it. The
events it held back are recorded too (``held`` records, each a batch of counts per
cluster, kind and node), so that whichever worker is active when the silence ends can
mail the summary, and a ``summarised`` record says that it did. ``sync`` records carry
nothing: a reader that reads its own one back knows it has read everything before it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any, Final, Literal

from shared.config import is_key_pattern
from shared.errors import ClusteralertError
from shared.event import PARAM_KEY_RE, Event, clean_text
from shared.own_events import OWN_MODULE

__all__ = [
    "MAX_SILENCE",
    "RECORD_VERSION",
    "HeldRow",
    "InvalidSilence",
    "Record",
    "Silence",
    "SilenceBook",
    "decode_record",
    "encode_record",
    "held_record",
    "new_silence",
    "parse_duration",
    "parse_until",
    "summarised_record",
    "sync_record",
]

RECORD_VERSION: Final = 1
# Longer silences are refused: the stream's retention (shared.topology) must keep the
# record that starts a silence for as long as it lasts.
MAX_SILENCE: Final = timedelta(days=30)
MAX_COMMENT_CHARS: Final = 1000
MAX_MATCHERS: Final = 64
_DURATION_RE: Final = re.compile(r"(\d+)([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RecordType = Literal["add", "expire", "held", "summarised", "sync"]
_TYPES: Final = ("add", "expire", "held", "summarised", "sync")
# A held count at most this (exact in a JSON reader of any language): sums of many stay
# far from the size past which Python refuses to turn an int into a string.
MAX_COUNT: Final = 2**53 - 1


class InvalidSilence(ClusteralertError):
    """Bad input for a silence (one line), or a record that is not one."""


def parse_duration(value: str) -> timedelta:
    """``90m``, ``2h``, ``1d``, ``30s``: a positive duration of at most MAX_SILENCE."""
    match = _DURATION_RE.fullmatch(value.strip())
    if not match:
        raise InvalidSilence(f"--for {value!r}: expected a duration like 90m, 2h or 1d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise InvalidSilence(f"--for {value!r}: must be longer than zero")
    if seconds > MAX_SILENCE.total_seconds():
        raise InvalidSilence(f"--for {value!r}: at most {MAX_SILENCE.days}d")
    return timedelta(seconds=seconds)


def parse_until(value: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; without a zone it is UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidSilence(
            f"--until {value!r}: expected a time like 2026-11-27T22:00:00Z"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Silence:
    id: str
    matchers: tuple[str, ...]  # module:event_id patterns, as in [filter]
    start: datetime
    end: datetime
    author: str
    comment: str
    cluster: str | None = None
    node: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    def matches(self, event: Event) -> bool:
        """Whether it covers ``event`` (its time aside: see :meth:`SilenceBook.silencing`)."""
        if self.cluster is not None and event.cluster != self.cluster:
            return False
        if self.node is not None and event.node != self.node:
            return False
        if any(event.params.get(k) != v for k, v in self.params.items()):
            return False
        return any(fnmatchcase(event.key, pattern) for pattern in self.matchers)

    def describe(self) -> str:
        """The matchers and scope on one line, e.g. ``monitor:* node=node2``."""
        scope = [f"cluster={self.cluster}"] if self.cluster is not None else []
        scope += [f"node={self.node}"] if self.node is not None else []
        scope += [f"{k}={v}" for k, v in sorted(self.params.items())]
        return " ".join([*self.matchers, *scope])


def new_silence(
    matchers: Iterable[str],
    *,
    now: datetime,
    duration: timedelta | None = None,
    until: datetime | None = None,
    comment: str,
    author: str,
    cluster: str | None = None,
    node: str | None = None,
    params: Mapping[str, str] | None = None,
) -> Silence:
    """A checked silence starting ``now``; :class:`InvalidSilence` with one line when
    the input is wrong."""
    patterns = tuple(matchers)
    if not patterns:
        raise InvalidSilence("give at least one module:event_id pattern to silence")
    if len(patterns) > MAX_MATCHERS:
        raise InvalidSilence(f"at most {MAX_MATCHERS} patterns")
    for pattern in patterns:
        if not is_key_pattern(pattern):
            raise InvalidSilence(
                f"{pattern!r:.60}: expected module:event_id (wildcards * and ? allowed), "
                "e.g. monitor:* or pacemaker:1?"
            )
        if pattern.partition(":")[0] == OWN_MODULE:
            raise InvalidSilence(
                f"{pattern!r:.60}: module {OWN_MODULE} is the pipeline's own (canary, "
                "heartbeats, summaries), which no silence holds back"
            )
    for option, value in (("--cluster", cluster), ("--node", node)):
        if value is not None and not value.strip():
            raise InvalidSilence(f"{option}: empty; give a name, or leave the option out")
    if not comment.strip():
        raise InvalidSilence("--comment: say why (it is shown in 'silence list' and the summary)")
    if (duration is None) == (until is None):
        raise InvalidSilence("give exactly one of --for and --until")
    end = now + duration if duration is not None else until
    assert end is not None
    if end <= now:
        raise InvalidSilence(f"the end {end.isoformat()} is not in the future")
    if end - now > MAX_SILENCE:
        raise InvalidSilence(f"the end {end.isoformat()} is more than {MAX_SILENCE.days}d away")
    for key, value in (params or {}).items():
        if not PARAM_KEY_RE.fullmatch(key):
            raise InvalidSilence(
                f"--param {key!r:.60}: expected KEY=VALUE with KEY in [A-Za-z0-9_]"
            )
        if not value:
            raise InvalidSilence(f"--param {key:.60}=: empty; give a value")
    return Silence(
        id=str(uuid.uuid4()),
        matchers=patterns,
        start=now,
        end=end,
        author=clean_text(author, 255),
        comment=clean_text(comment.strip(), MAX_COMMENT_CHARS),
        cluster=cluster,
        node=node,
        params=dict(params or {}),
    )


@dataclass(frozen=True, slots=True)
class HeldRow:
    """Events of one kind on one node that a silence held back: how many, when."""

    cluster: str
    key: str
    node: str
    count: int
    first: datetime
    last: datetime

    def merged(self, other: HeldRow) -> HeldRow:
        return HeldRow(
            self.cluster,
            self.key,
            self.node,
            self.count + other.count,
            min(self.first, other.first),
            max(self.last, other.last),
        )

    @classmethod
    def of(cls, event: Event) -> HeldRow:
        return cls(event.cluster, event.key, event.node, 1, event.time, event.time)


@dataclass(frozen=True, slots=True)
class Record:
    type: RecordType
    id: str  # the silence's id; a sync record's nonce
    silence: Silence | None = None  # add
    at: datetime | None = None  # expire: when
    author: str | None = None  # expire: who
    rows: tuple[HeldRow, ...] = ()  # held


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def encode_record(record: Record) -> bytes:
    doc: dict[str, Any] = {"silences": RECORD_VERSION, "type": record.type, "id": record.id}
    s = record.silence
    if s is not None:
        doc.update(
            matchers=list(s.matchers),
            start=_time(s.start),
            end=_time(s.end),
            author=s.author,
            comment=s.comment,
            cluster=s.cluster,
            node=s.node,
            params=dict(s.params),
        )
    if record.at is not None:
        doc["at"] = _time(record.at)
    if record.author is not None:
        doc["author"] = record.author
    if record.rows:
        doc["rows"] = [
            [r.cluster, r.key, r.node, r.count, _time(r.first), _time(r.last)] for r in record.rows
        ]
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _str(doc: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidSilence(f"silence record: {name} is not a string")
    return value


def _parse_time(value: object, name: str) -> datetime:
    """In UTC, converted here: a time whose offset takes it out of years 1 to 9999 (say
    ``0001-01-01T00:00:00+05:00``) is refused now, not when something formats it."""
    try:
        if not isinstance(value, str):
            raise ValueError
        parsed = datetime.fromisoformat(value)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidSilence(f"silence record: {name} is not a time") from None


def _row(raw: object) -> HeldRow:
    if not (isinstance(raw, list) and len(raw) == 6 and all(isinstance(x, str) for x in raw[:3])):
        raise InvalidSilence("silence record: a held row is not [cluster, key, node, ...]")
    count = raw[3]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise InvalidSilence(
            f"silence record: a held row's count is not a number from 1 to {MAX_COUNT}"
        )
    return HeldRow(
        raw[0], raw[1], raw[2], count, _parse_time(raw[4], "first"), _parse_time(raw[5], "last")
    )


def decode_record(raw: bytes) -> Record:
    """One record from the stream; :class:`InvalidSilence` (one line) if it is none."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InvalidSilence("silence record: not JSON") from None
    version = doc.get("silences") if isinstance(doc, dict) else None
    # The type too: True and 1.0 are equal to 1.
    if type(version) is not int or version != RECORD_VERSION:
        raise InvalidSilence("silence record: not a version 1 record")
    kind = doc.get("type")
    if kind not in _TYPES:
        raise InvalidSilence(f"silence record: unknown type {str(kind)[:20]!r}")
    ident = _str(doc, "id")
    if kind == "add":
        matchers = doc.get("matchers")
        if not isinstance(matchers, list) or not all(isinstance(m, str) for m in matchers):
            raise InvalidSilence("silence record: matchers is not a list of patterns")
        params = doc.get("params") or {}
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in params.items()
        ):
            raise InvalidSilence("silence record: params is not a table of strings")
        silence = Silence(
            id=ident,
            matchers=tuple(matchers),
            start=_parse_time(doc.get("start"), "start"),
            end=_parse_time(doc.get("end"), "end"),
            author=_str(doc, "author"),
            comment=_str(doc, "comment"),
            cluster=_str(doc, "cluster", optional=True),
            node=_str(doc, "node", optional=True),
            params=params,
        )
        return Record("add", ident, silence=silence)
    if kind == "expire":
        at = _parse_time(doc.get("at"), "at")
        return Record("expire", ident, at=at, author=_str(doc, "author", optional=True))
    if kind == "held":
        rows = doc.get("rows")
        if not isinstance(rows, list) or not rows:
            raise InvalidSilence("silence record: held rows missing")
        return Record("held", ident, rows=tuple(_row(r) for r in rows))
    return Record(kind, ident)


def held_record(silence_id: str, rows: Iterable[HeldRow]) -> Record:
    return Record("held", silence_id, rows=tuple(rows))


def summarised_record(silence_id: str) -> Record:
    return Record("summarised", silence_id)


def sync_record() -> Record:
    return Record("sync", str(uuid.uuid4()))


RowKey = tuple[str, str, str]


@dataclass(slots=True)
class _State:
    silence: Silence
    expired_at: datetime | None = None
    expired_by: str | None = None
    held: dict[RowKey, HeldRow] = field(default_factory=dict)
    summarised: bool = False

    @property
    def held_count(self) -> int:
        return sum(row.count for row in self.held.values())


class SilenceBook:
    """Every silence the stream told of, folded from its records in stream order."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def apply(self, record: Record) -> None:
        if record.type == "add":
            assert record.silence is not None
            self._states.setdefault(record.id, _State(record.silence))
            return
        state = self._states.get(record.id)
        if state is None:
            return  # its add record is past the stream's retention, or a sync record
        if record.type == "expire":
            if state.expired_at is None and record.at is not None and record.at < state.silence.end:
                state.expired_at, state.expired_by = record.at, record.author
        elif record.type == "held":
            for row in record.rows:
                key = (row.cluster, row.key, row.node)
                old = state.held.get(key)
                state.held[key] = row if old is None else old.merged(row)
        elif record.type == "summarised":
            state.summarised = True

    def __contains__(self, silence_id: str) -> bool:
        return silence_id in self._states

    def silence(self, silence_id: str) -> Silence:
        return self._states[silence_id].silence

    def summarised(self, silence_id: str) -> bool:
        return self._states[silence_id].summarised

    def expired_by(self, silence_id: str) -> str | None:
        """Who expired it early (None when it ran to its end)."""
        state = self._states[silence_id]
        return state.expired_by if state.expired_at is not None else None

    def end(self, silence_id: str) -> datetime:
        """When it ends or ended: its end time, or when it was expired, if sooner."""
        state = self._states[silence_id]
        return state.expired_at or state.silence.end

    def silencing(self, event: Event, now: datetime) -> Silence | None:
        """The active silence that covers ``event`` at ``now``, if any (the one that
        started first, so that the same one keeps taking a kind's events)."""
        for state in self._states.values():
            s = state.silence
            if s.start <= now < self.end(s.id) and s.matches(event):
                return s
        return None

    def active(self, now: datetime) -> int:
        """How many silences are in force at ``now``."""
        return sum(
            1 for st in self._states.values() if st.silence.start <= now < self.end(st.silence.id)
        )

    def ended_unsummarised(self, now: datetime) -> list[Silence]:
        """Silences over at ``now`` whose summary no record says was sent."""
        return [
            st.silence
            for st in self._states.values()
            if not st.summarised and self.end(st.silence.id) <= now
        ]

    def held(self, silence_id: str) -> list[HeldRow]:
        return sorted(self._states[silence_id].held.values(), key=lambda r: (-r.count, r.key))

    def listing(self, now: datetime, *, everything: bool = False) -> list[dict[str, object]]:
        """What ``silence list`` shows: the active silences, or with ``everything`` all
        that the stream still holds; oldest first."""
        shown: list[dict[str, object]] = []
        for state in sorted(self._states.values(), key=lambda st: st.silence.start):
            s = state.silence
            end = self.end(s.id)
            if not everything and end <= now:
                continue
            shown.append(
                {
                    "id": s.id,
                    "matchers": list(s.matchers),
                    "cluster": s.cluster,
                    "node": s.node,
                    "params": dict(s.params),
                    "start": _time(s.start),
                    "end": _time(end),
                    "active": s.start <= now < end,
                    "expired_by": state.expired_by,
                    "author": s.author,
                    "comment": s.comment,
                    "held": state.held_count,
                    "summarised": state.summarised,
                }
            )
        return shown


def format_time(value: datetime) -> str:
    return _time(value)
