"""The notification: what the incident stage hands the delivery stage through
``clusteralert.mail``, one per mail, and its JSON wire codec.

A notification is one of four kinds:

* ``incident``: one incident, its first report in full, every reporter and how often it
  reported, and (when the failure ended while the stage still held it) its resolution;
* ``repeat``: a still-recurring incident mailed again after ``repeat_interval``, with how
  often it was seen since the last mail; a reply in the incident's thread;
* ``recovery``: the report that ended a mailed incident, how long it lasted, a reply in the
  incident's thread;
* ``digest``: a storm's incidents, one item each;
* ``silence``: what a silence held back, summarised when it ended (one item: an event
  of module ``clusteralert`` made by the stage, see :mod:`worker.silence_summary`).

The wire form is versioned and strict: anything malformed raises :class:`InvalidEvent`
with a one-line reason (the worker dead-letters it as ``invalid_event``). Events inside
are checked and cleaned by the event codec, so a notification carries nothing an event
could not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from shared.errors import InvalidEvent
from shared.event import (
    MAX_EVENT_BYTES,
    Event,
    canonical_uuid,
    clean_text,
    event_doc,
    event_from_doc,
)

__all__ = [
    "DIGEST_PREFIX",
    "MAX_BUNDLE",
    "MAX_IDS",
    "MAX_NOTIFICATION_BYTES",
    "NOTIFICATION_VERSION",
    "Bundle",
    "Item",
    "Kind",
    "Notification",
    "decode_mail_body",
    "decode_notification",
    "encode_bundle",
    "encode_notification",
    "is_bundle",
    "is_notification",
    "single",
    "split_bundle",
]

NOTIFICATION_VERSION: Final = 1
# Well under RabbitMQ's message size limit. The stage splits digests long before this
# (see worker.incident), so only a forged or corrupt message can exceed it.
MAX_NOTIFICATION_BYTES: Final = 8 * 1024 * 1024
MAX_ITEMS: Final = 10_000
# Event ids listed per item; an incident merged from more reports says how many in
# ``reports`` and lists the first ones.
MAX_IDS: Final = 1000
MAX_REPORTERS: Final = 1000
Kind = Literal["incident", "repeat", "recovery", "digest", "silence"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
DIGEST_PREFIX: Final = "digest-"  # a digest's Message-ID: <digest-FIRST_EVENT_ID@DOMAIN>
# Notifications the stage publishes in one message at most (see Bundle).
MAX_BUNDLE: Final = 16
_BUNDLE_HEAD: Final = b'{"bundle":'


@dataclass(frozen=True, slots=True)
class Item:
    """One incident (or, in a recovery, the reports that ended one)."""

    event: Event  # the first report, rendered in the mail
    ids: tuple[str, ...]  # every report's event id, the first first (at most MAX_IDS)
    reporters: tuple[tuple[str, int], ...]  # who reported it and how often, first seen first
    reports: int = 1  # reports covered, including those beyond ``ids``
    since: int = 0  # repeat: reports folded since the previous mail
    # The Message-ID local part of the mail this one answers: the incident's first event
    # id, or DIGEST_PREFIX and a digest's first event id.
    replies_to: str | None = None
    duration: float | None = None  # seconds from the failure to its resolution
    resolved: Item | None = None  # the reports that ended it while it was still held


@dataclass(frozen=True, slots=True)
class Notification:
    kind: Kind
    items: tuple[Item, ...]
    window: float = 0.0  # digest: the storm window, seconds

    @property
    def first(self) -> Event:
        return self.items[0].event

    @property
    def events(self) -> int:
        """How many events (reports) it covers."""
        return sum(i.reports + (i.resolved.reports if i.resolved else 0) for i in self.items)

    def summary(self, keys: int = 3) -> str:
        """One line for logs and ``dlq list``: the kind, the count and the commonest
        kinds of event, e.g. ``digest of 490 events: rm:9 x480, nm:2 x10``."""
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.event.key] = counts.get(item.event.key, 0) + item.reports
            if item.resolved is not None:
                key = item.resolved.event.key
                counts[key] = counts.get(key, 0) + item.resolved.reports
        common = sorted(counts.items(), key=lambda kv: -kv[1])[:keys]
        shown = ", ".join(f"{key} x{count}" for key, count in common)
        more = ", ..." if len(counts) > keys else ""
        return f"{self.kind} of {self.events} event(s): {shown}{more}"

    @property
    def event_ids(self) -> tuple[str, ...]:
        """Every covered event id, for logs and ``dlq show``."""
        ids: list[str] = []
        for item in self.items:
            ids += item.ids
            if item.resolved is not None:
                ids += item.resolved.ids
        return tuple(ids)


def _item_doc(item: Item) -> dict[str, object]:
    doc: dict[str, object] = {
        "event": event_doc(item.event),
        "ids": list(item.ids),
        "reporters": [list(pair) for pair in item.reporters],
        "reports": item.reports,
    }
    if item.since:
        doc["since"] = item.since
    if item.replies_to is not None:
        doc["replies_to"] = item.replies_to
    if item.duration is not None:
        doc["duration"] = round(item.duration, 3)
    if item.resolved is not None:
        doc["resolved"] = _item_doc(item.resolved)
    return doc


def encode_notification(notification: Notification) -> bytes:
    doc: dict[str, object] = {
        "notification": NOTIFICATION_VERSION,
        "kind": notification.kind,
        "items": [_item_doc(item) for item in notification.items],
    }
    if notification.kind == "digest":
        doc["window"] = notification.window
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_NOTIFICATION_BYTES:
        raise InvalidEvent(
            f"notification is {len(raw)} bytes, at most {MAX_NOTIFICATION_BYTES} allowed"
        )
    return raw


def is_notification(raw: bytes) -> bool:
    """Whether a message on the mail queue looks like a notification rather than a bare
    event (a 0.1 message, or a 0.1 dead letter replayed): a cheap look at its start, as
    :func:`encode_notification` writes it. :func:`decode_mail_body` decides for sure."""
    return raw[:40].lstrip().startswith(b'{"notification"')


def single(event: Event) -> Notification:
    """A bare event as a notification of one incident with one report."""
    return Notification("incident", (Item(event, (event.id,), ((event.reported_by, 1),)),))


def decode_mail_body(raw: bytes) -> Notification | Event:
    """A message from the mail queue: a notification, or a bare event (from 0.1, or a 0.1
    dead letter replayed), which the delivery stage mails on its own as before.
    :class:`InvalidEvent` with a one-line reason when it is neither."""
    doc = _parse(raw)
    if isinstance(doc, dict) and "notification" in doc:
        return _notification(doc)
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(raw)} bytes, at most {MAX_EVENT_BYTES} allowed")
    return event_from_doc(doc)


def _field(doc: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        got = "nothing" if value is None else type(value).__name__
        raise InvalidEvent(f"notification {where}{name}: expected {kind.__name__}, got {got}")
    return value


def _uuid(value: object, where: str) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        return canonical_uuid(value)
    except ValueError:
        raise InvalidEvent(f"notification {where}: not an event id: {str(value)[:40]!r}") from None


def _item(doc: object, where: str, depth: int = 0) -> Item:
    if not isinstance(doc, dict):
        raise InvalidEvent(f"notification {where}: expected an object")
    try:
        event = event_from_doc(doc.get("event"))
    except InvalidEvent as exc:
        raise InvalidEvent(f"notification {where}.event: {exc}") from None
    ids = _field(doc, "ids", list, f"{where}.")
    if not 1 <= len(ids) <= MAX_IDS:
        raise InvalidEvent(f"notification {where}.ids: 1 to {MAX_IDS} ids expected")
    ids = [_uuid(i, f"{where}.ids") for i in ids]
    raw_reporters = _field(doc, "reporters", list, f"{where}.")
    if not 1 <= len(raw_reporters) <= MAX_REPORTERS:
        raise InvalidEvent(f"notification {where}.reporters: 1 to {MAX_REPORTERS} expected")
    reporters: list[tuple[str, int]] = []
    for pair in raw_reporters:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or isinstance(pair[1], bool)
            or not isinstance(pair[1], int)
            or pair[1] < 1
        ):
            raise InvalidEvent(f"notification {where}.reporters: expected [name, count] pairs")
        reporters.append((clean_text(pair[0], 1024), pair[1]))
    reports = _field(doc, "reports", int, f"{where}.")
    since = doc.get("since", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0 or reports < len(ids):
        raise InvalidEvent(f"notification {where}: bad counts")
    replies_to = doc.get("replies_to")
    if replies_to is not None:
        # The answered mail's Message-ID local part: an event id, or a digest's.
        digest = isinstance(replies_to, str) and replies_to.startswith(DIGEST_PREFIX)
        bare = replies_to[len(DIGEST_PREFIX) :] if digest else replies_to
        replies_to = (DIGEST_PREFIX if digest else "") + _uuid(bare, f"{where}.replies_to")
    duration = doc.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0
    ):
        raise InvalidEvent(f"notification {where}.duration: expected seconds")
    resolved = None
    if doc.get("resolved") is not None:
        if depth:
            raise InvalidEvent(f"notification {where}.resolved: nested too deep")
        resolved = _item(doc["resolved"], f"{where}.resolved", depth + 1)
    return Item(
        event=event,
        ids=tuple(ids),
        reporters=tuple(reporters),
        reports=reports,
        since=since,
        replies_to=replies_to,
        duration=None if duration is None else float(duration),
        resolved=resolved,
    )


def _parse(raw: bytes) -> object:
    if len(raw) > MAX_NOTIFICATION_BYTES:
        raise InvalidEvent(
            f"notification is {len(raw)} bytes, at most {MAX_NOTIFICATION_BYTES} allowed"
        )
    try:
        return json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"not JSON: {str(exc)[:200]}") from None


def decode_notification(raw: bytes) -> Notification:
    """Parse and check a notification; :class:`InvalidEvent` with a one-line reason."""
    return _notification(_parse(raw))


def _notification(doc: object) -> Notification:
    if not isinstance(doc, dict):
        raise InvalidEvent("notification: expected a JSON object")
    version = doc.get("notification")
    if version != NOTIFICATION_VERSION:
        raise InvalidEvent(f"notification: unsupported version {str(version)[:20]}")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise InvalidEvent(f"notification kind: expected one of {', '.join(KINDS)}")
    items = _field(doc, "items", list, "")
    if not 1 <= len(items) <= (MAX_ITEMS if kind == "digest" else 1):
        raise InvalidEvent(f"notification items: {len(items)} is not allowed for a {kind}")
    window = doc.get("window", 0.0)
    if isinstance(window, bool) or not isinstance(window, int | float) or window < 0:
        raise InvalidEvent("notification window: expected seconds")
    parsed = tuple(_item(item, f"items[{i}]") for i, item in enumerate(items))
    if kind in ("recovery", "repeat") and parsed[0].replies_to is None:
        raise InvalidEvent(f"notification: a {kind} must name the mail it answers")
    return Notification(kind=kind, items=parsed, window=float(window))


@dataclass(frozen=True, slots=True)
class Bundle:
    """Several notifications in one message on the mail queue, as the incident stage
    publishes what one of its passes gave: each message costs py-amqp a publish and
    its confirm in the stage and a delivery in the worker, far more CPU than a
    notification's own JSON. The wire form is a head line, ``{"bundle":1,"ids":[...]}``
    with each part's message id, then one line per part: the part's bytes exactly as
    :func:`encode_notification` wrote them (compact JSON never holds a line feed), so a
    part retried or dead-lettered on its own is the very message it would have been.
    The delivery stage mails each part as its own message and acks the bundle when
    every part is settled."""

    ids: tuple[str, ...]  # each part's message id (see the stage's message ids)
    parts: tuple[bytes, ...]


def encode_bundle(parts: Sequence[tuple[str, bytes]]) -> bytes:
    """One message of ``parts``: (message id, encoded notification) pairs."""
    head = {"bundle": 1, "ids": [message_id for message_id, _ in parts]}
    lines = [json.dumps(head, separators=(",", ":")).encode("ascii")]
    for _, body in parts:
        assert b"\n" not in body, "an encoded notification is one line"
        lines.append(body)
    return b"\n".join(lines)


def is_bundle(raw: bytes) -> bool:
    """Whether a message on the mail queue is a bundle (a cheap look at its start, as
    :func:`encode_bundle` writes it; :func:`split_bundle` decides for sure)."""
    return raw.startswith(_BUNDLE_HEAD)


def split_bundle(raw: bytes) -> Bundle:
    """A bundle's parts, unparsed: each is checked when it is handled, like any
    notification. :class:`InvalidEvent` with a one-line reason when the framing is
    wrong; then the message as a whole is refused, and kept, like any malformed one."""
    if len(raw) > MAX_NOTIFICATION_BYTES:
        raise InvalidEvent(f"bundle is {len(raw)} bytes, at most {MAX_NOTIFICATION_BYTES}")
    head, *parts = raw.split(b"\n")
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise InvalidEvent("bundle: its first line is not JSON") from None
    version = doc.get("bundle") if isinstance(doc, dict) else None
    if isinstance(version, bool) or version != 1:
        raise InvalidEvent("bundle: unsupported version")
    ids = doc.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_BUNDLE:
        raise InvalidEvent(f"bundle ids: 1 to {MAX_BUNDLE} expected")
    if len(parts) != len(ids):
        raise InvalidEvent(f"bundle: {len(ids)} ids but {len(parts)} parts")
    checked = []
    for message_id in ids:
        digest = isinstance(message_id, str) and message_id.startswith(DIGEST_PREFIX)
        bare = message_id[len(DIGEST_PREFIX) :] if digest else message_id
        checked.append((DIGEST_PREFIX if digest else "") + _uuid(bare, "bundle ids"))
    return Bundle(tuple(checked), tuple(parts))
