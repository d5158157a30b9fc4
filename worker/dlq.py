"""The dead-letter queue, for operators: list, show, replay and purge.

RabbitMQ cannot browse a queue without taking its messages. So every command takes the
messages it looks at without acking them, and gives back everything it did not replay or
purge by closing its channel: the broker then requeues them unchanged (the order may
change). An interrupted command, even ``kill -9``, closes the connection and so gives
everything back too. The DLQ has no delivery limit, so this never dead-letters further.

Replay publishes a message to the work queue with a confirm before it acks it in the
DLQ, so an interruption half-way leaves each message in the DLQ, back in the work queue,
or (rarely) both; never neither.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from shared.errors import ClusteralertError
from shared.topology import DEAD_QUEUE, WORK_QUEUE
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
from worker.settle import Settler, copy_properties

__all__ = ["DeadMessage", "DlqFilter", "DlqSession", "parse_since"]

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
        )

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "time": self.time,
            "node": self.node,
            "event": self.key,
            "reason": self.reason,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``1d`` ago, or an RFC 3339 time."""
    match = _DURATION_RE.fullmatch(value.strip())
    now = now or datetime.now(UTC)
    if match:
        return now - timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
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
        if self.ids and message.id not in self.ids:
            return False
        if self.since is not None:
            try:
                when = datetime.fromisoformat(message.time)
            except ValueError:
                return False
            if when < self.since:
                return False
        return True


class DlqSession:
    """Takes DLQ messages on one channel; :meth:`close` gives back all not settled."""

    def __init__(self, connection: Any):
        self._connection = connection
        self._channel = connection.channel()
        self._settler = Settler(connection)

    def take(self, limit: int | None = None) -> Iterator[DeadMessage]:
        """Every message now in the DLQ (each once), up to ``limit``."""
        queued = self._channel.queue_declare(DEAD_QUEUE, passive=True).message_count
        taken = 0
        while taken < queued and (limit is None or taken < limit):
            raw = self._channel.basic_get(DEAD_QUEUE, no_ack=False)
            if raw is None:
                return
            taken += 1
            yield DeadMessage.from_message(raw)

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
        self._settler.publish_confirmed(message.raw.body, properties, "", WORK_QUEUE)
        self._channel.basic_ack(message.raw.delivery_tag)

    def purge(self, message: DeadMessage) -> None:
        self._channel.basic_ack(message.raw.delivery_tag)

    def close(self) -> None:
        """Give back everything taken and not settled: closing the channel requeues it."""
        # A failure here is harmless: closing the connection requeues them as well.
        with contextlib.suppress(Exception):
            self._channel.close()
