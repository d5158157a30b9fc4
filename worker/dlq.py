"""The dead-letter queue, for operators: list, show, replay and purge.

RabbitMQ cannot browse a queue without taking its messages, and every message a quorum
queue hands back (reject, nack, or a closed channel) counts as a delivery. RabbitMQ 4
gives every quorum queue a delivery limit of 20 by default, and a policy can set one on
3.x; past it, a DLQ without a dead-letter target of its own drops the message. So a
browse never hands messages back: it takes each one, publishes an identical copy to the
back of the DLQ, and acks the original only once the broker has confirmed the copy. The
copy starts with a fresh delivery count. Taking the whole queue once keeps its order.

Replay publishes to the work queue instead, purge only acks. Either way an original is
acked only after its next home is confirmed, so an interruption (even ``kill -9``) leaves
each message in the DLQ, moved on, or (rarely) both; never neither. What an interrupted
command held unsettled goes back the usual way, once, which is far from any limit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

from shared.errors import ClusteralertError, InvalidEvent
from shared.notification import (
    Notification,
    decode_notification,
    is_bundle,
    is_notification,
    split_bundle,
)
from shared.topology import DEAD_QUEUE, WORK_QUEUE
from worker.broker import (
    BrokerError,
    ConfirmedPublisher,
    PublishNotConfirmed,
    copy_properties,
    talking,
)
from worker.retry_policy import (
    HEADER_ATTEMPTS,
    HEADER_CAUSE,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_LAST_FAILURE,
    HEADER_REASON,
    HEADER_REPLAYED,
    without_broker_headers,
)

__all__ = ["DeadMessage", "DlqError", "DlqFilter", "DlqSession", "parse_since"]

# Annotations the broker adds to each delivery; a copy must start without them.
_PER_DELIVERY_HEADERS: Final = ("x-delivery-count", "x-acquired-count")
_CONFIRM_BATCH: Final = 256

# Headers a replay resets, so the replayed message gets a fresh retry window.
_FAILURE_HEADERS: Final = (
    HEADER_ATTEMPTS,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_FAILURE,
    HEADER_REASON,
    HEADER_CAUSE,
    HEADER_LAST_ERROR,
)
_DURATION_RE: Final = re.compile(r"(\d+)([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


@dataclass
class DeadMessage:
    """One message taken from the DLQ, with what an operator needs to see."""

    raw: Any = field(repr=False)
    id: str
    time: str
    node: str
    module: str
    event_id: str
    reason: str
    attempts: int
    last_error: str
    headers: dict[str, Any]
    settled: bool = False
    # A notification from the incident stage: its one-line summary and every event id it
    # covers (empty for a bare event, such as a 0.1 dead letter).
    notification: str = ""
    events: tuple[str, ...] = ()

    @property
    def digest(self) -> bytes:
        """Tells this message from others with the same id, e.g. across two sessions."""
        body = self.raw.body
        return hashlib.sha256(body if isinstance(body, bytes) else str(body).encode()).digest()

    @property
    def key(self) -> str:
        return f"{self.module}:{self.event_id}"

    @classmethod
    def from_message(cls, raw: Any) -> DeadMessage:
        headers = dict(raw.properties.get("application_headers") or {})
        try:
            doc = json.loads(raw.body)
            if not isinstance(doc, dict):
                doc = {}
        except (ValueError, TypeError):
            doc = {}
        reason = _text(headers.get(HEADER_REASON))
        if not reason:
            # Dead-lettered by the broker itself, e.g. the delivery limit of a message
            # that kept crashing workers.
            reason = _text(headers.get("x-first-death-reason")) or "unknown"
            reason = "delivery_limit" if reason == "delivery_limit" else f"broker:{reason}"
        attempts = headers.get(HEADER_ATTEMPTS, 0)
        notification = _notification(raw.body)
        if notification is not None:
            first = notification.first.first
            doc = {
                "id": raw.properties.get("message_id") or first.id,
                "time": first.time.isoformat(),
                "node": first.node,
                "module": first.module,
                "event_id": first.event_id,
            }
        return cls(
            raw=raw,
            id=_text(doc.get("id") or raw.properties.get("message_id") or "?"),
            time=_text(doc.get("time", "?")),
            node=_text(doc.get("node", "?")),
            module=_text(doc.get("module", "?")),
            event_id=_text(doc.get("event_id", "?")),
            reason=reason,
            attempts=attempts if isinstance(attempts, int) else 0,
            last_error=_text(headers.get(HEADER_LAST_ERROR)),
            headers=headers,
            notification=notification.summary if notification is not None else "",
            events=notification.events if notification is not None else (),
        )

    def summary(self) -> dict[str, object]:
        if self.notification:
            return {**self._summary(), "notification": self.notification}
        return self._summary()

    def _summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "time": self.time,
            "node": self.node,
            "event": self.key,
            "reason": self.reason,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


class _Held(NamedTuple):
    """What a dead letter from the incident stage holds: a notification, or a bundle of
    them (dead-lettered whole only by the broker, see worker.bundle)."""

    first: Notification
    summary: str
    events: tuple[str, ...]


def _notification(body: object) -> _Held | None:
    """The notification(s) a dead letter holds, or None for a bare event or garbage."""
    if not isinstance(body, bytes):
        return None
    try:
        if is_bundle(body):
            return _bundle(body)
        if is_notification(body):
            notification = decode_notification(body)
            return _Held(notification, notification.summary(), notification.event_ids)
    except InvalidEvent:
        pass
    return None


def _bundle(body: bytes) -> _Held | None:
    """A bundle's readable notifications: one unreadable part must not hide the rest."""
    raw = split_bundle(body).parts
    parts: list[Notification] = []
    for part in raw:
        try:
            parts.append(decode_notification(part))
        except InvalidEvent:
            continue
    if not parts:
        return None
    bad = f" ({len(raw) - len(parts)} unreadable)" if len(parts) < len(raw) else ""
    summary = f"bundle of {len(raw)} notifications{bad}, the first a {parts[0].summary()}"
    return _Held(parts[0], summary, tuple(i for p in parts for i in p.event_ids))


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d`` ago, or an RFC 3339 time."""
    match = _DURATION_RE.fullmatch(value.strip())
    now = now or datetime.now(UTC)
    if match:
        try:
            return now - timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
        except OverflowError:
            raise ClusteralertError(f"--since {value!r}: too long ago") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ClusteralertError(
            f"--since {value!r}: expected a duration like 2h or an RFC 3339 time"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DlqFilter:
    reason: str | None = None
    node: str | None = None
    module: str | None = None
    event: str | None = None  # "module:event_id" or an event id
    since: datetime | None = None
    ids: frozenset[str] = frozenset()

    def matches(self, message: DeadMessage) -> bool:
        if self.reason and message.reason != self.reason:
            return False
        if self.node and message.node != self.node:
            return False
        if self.module and message.module != self.module:
            return False
        if self.event and self.event not in (message.key, message.event_id):
            return False
        # A notification also answers to any event id it covers.
        if self.ids and message.id not in self.ids and self.ids.isdisjoint(message.events):
            return False
        if self.since is not None:
            try:
                when = datetime.fromisoformat(message.time)
            except ValueError:
                return False
            # A time without an offset is taken as UTC, as --since itself is.
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            if when < self.since:
                return False
        return True


class DlqError(BrokerError):
    """The broker refused a copy, or had no queue for it. Nothing was acked that should
    not have been: what is unsettled goes back when the connection is dropped."""


class DlqSession:
    """Walks the DLQ once on one confirmed channel: see the module docstring."""

    def __init__(self, connection: Any, timeout: float):
        self._user = connection.userid
        self._publisher = ConfirmedPublisher(connection, timeout)
        self._channel = self._publisher.channel

    def take(self) -> Iterator[DeadMessage]:
        """Every message now in the DLQ, once each, in queue order. Callers must exhaust
        it: a message neither replayed nor purged by the time the next one is asked for
        is kept (copied to the back of the DLQ)."""
        with talking():
            queued = self._channel.queue_declare(DEAD_QUEUE, passive=True).message_count
        # Exactly as many as were queued: the copies behind them are not taken again.
        for _ in range(queued):
            with talking():
                raw = self._channel.basic_get(DEAD_QUEUE, no_ack=False)
            if raw is None:
                break
            message = DeadMessage.from_message(raw)
            yield message
            if not message.settled:
                self._keep(message)
        self._flush()

    def _keep(self, message: DeadMessage) -> None:
        properties = {
            k: v
            for k, v in message.raw.properties.items()
            # The broker refuses a user_id other than the publisher's own login.
            if k != "application_headers" and (k != "user_id" or v == self._user)
        }
        headers = {k: v for k, v in message.headers.items() if k not in _PER_DELIVERY_HEADERS}
        properties["application_headers"] = headers
        self._publish(message, DEAD_QUEUE, properties)

    def replay(self, message: DeadMessage) -> None:
        """Back to the work queue (confirmed), then out of the DLQ."""
        headers = {
            k: v
            for k, v in without_broker_headers(message.headers).items()
            if k not in _FAILURE_HEADERS
        }
        replayed = message.headers.get(HEADER_REPLAYED, 0)
        headers[HEADER_REPLAYED] = (replayed if isinstance(replayed, int) else 0) + 1
        properties = copy_properties(dict(message.raw.properties), headers)
        # The default exchange reaches the work queue only, not other bindings.
        self._publish(message, WORK_QUEUE, properties)

    def purge(self, message: DeadMessage) -> None:
        message.settled = True
        with talking():
            self._channel.basic_ack(message.raw.delivery_tag)

    def _publish(self, message: DeadMessage, queue: str, properties: dict[str, Any]) -> None:
        message.settled = True
        delivery_tag = message.raw.delivery_tag

        def ack_original() -> None:
            self._channel.basic_ack(delivery_tag)

        self._publisher.publish(message.raw.body, properties, "", queue, ack_original)
        # Confirms are waited for in batches: one round trip per message would make a
        # browse of a large DLQ slow, and a bounded batch keeps memory bounded.
        if self._publisher.pending >= _CONFIRM_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Wait until every copy is confirmed (and its original acked)."""
        try:
            self._publisher.flush()
        except PublishNotConfirmed as exc:
            raise DlqError(f"{exc}; the dead letter stays in the DLQ") from None

    def close(self) -> None:
        """Close the channel: anything taken and not settled goes back, once. Its
        close-ok also tells that the broker has processed every ack before it."""
        with talking():
            self._channel.close()
