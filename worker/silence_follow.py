"""Following the ``clusteralert.silences`` stream on a :class:`~worker.broker.Broker`:
every record from the first offset, then each new one as it is written, folded into a
:class:`~shared.silence.SilenceBook`. Owner thread only, like the broker.

A stream has no "you have read everything" signal (queue.declare-ok counts nothing for
a stream), so the follower writes a ``sync`` record of its own and counts as caught up
once it reads that record back: everything written before it has been read. The
incident stage waits for that before it takes an event, so a worker started after a
silence was added honours it from its first event. The same barrier makes sure of the
latest counts before a summary is mailed.

If the stream does not take the sync record (a write not confirmed), the follower tries
again by itself, with backoff, from :meth:`SilenceFollower.service`: only the incident
stage waits for it; the delivery stage on the same connection keeps mailing.

Records are queued by the consumer callback and folded in :meth:`SilenceFollower.service`,
so the book never changes under a caller in the middle of a confirmed publish (which
services the connection while it waits).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from shared.backoff import Backoff
from shared.silence import InvalidSilence, Record, SilenceBook, decode_record, encode_record
from shared.silence import sync_record as new_sync_record
from shared.topology import SILENCES_STREAM
from worker.broker import Broker, BrokerUnavailable, Delivery, PublishNotConfirmed

if TYPE_CHECKING:
    from worker.metrics import Metrics

__all__ = ["SilenceFollower", "publish_record"]

log = logging.getLogger(__name__)

# Unacked records at most: a stream consumer needs a prefetch for credit, and acks.
STREAM_PREFETCH: Final = 1000
ACK_EVERY: Final = STREAM_PREFETCH // 4
# Between attempts to write the sync record that catching up needs.
_SYNC_RETRY_FIRST: Final = 1.0
_SYNC_RETRY_MAX: Final = 60.0


def publish_record(broker: Broker, record: Record) -> None:
    """Append one record, confirmed (raises PublishNotConfirmed otherwise)."""
    broker.publish_confirmed(
        encode_record(record),
        {"delivery_mode": 2, "content_type": "application/json"},
        "",
        SILENCES_STREAM,
        lane="silences",
    )


class SilenceFollower:
    def __init__(self, broker: Broker, metrics: Metrics | None = None):
        self.broker = broker
        self.metrics = metrics
        self._counted_at = 0.0
        self.book = SilenceBook()
        self.caught_up = False
        self._arrived: deque[Delivery] = deque()
        self._waiting: set[str] = set()  # our sync records not read back yet
        self._cancel: Callable[[], None] | None = None
        self._unacked: Delivery | None = None  # the last record read and not acked
        self._unacked_count = 0
        self._sync_backoff = Backoff(_SYNC_RETRY_FIRST, _SYNC_RETRY_MAX)
        self._sync_retry_at: float | None = None  # when to write the sync record again
        self.sync_failure: str | None = None  # why the last one was not written
        self.records_read = 0  # since start: how far a reader has come

    def start(self) -> None:
        """On a fresh connection: read everything again from the first record, into a
        new book (what was read on the lost connection may have been cut short)."""
        self.book = SilenceBook()
        self.caught_up = False
        self._arrived.clear()
        self._waiting.clear()
        self._unacked, self._unacked_count = None, 0
        self.records_read = 0
        self._cancel = self.broker.consume(
            SILENCES_STREAM,
            self._arrived.append,
            prefetch=STREAM_PREFETCH,
            arguments={"x-stream-offset": "first"},
        )
        self._sync_backoff.reset()
        self._catch_up()

    def _catch_up(self) -> None:
        """Write the sync record that catching up waits for; if the stream does not take
        it, schedule another attempt (see :meth:`service`)."""
        try:
            self.sync()
        except PublishNotConfirmed as exc:
            delay = self._sync_backoff.delay()
            self._sync_retry_at = time.monotonic() + delay
            self.sync_failure = str(exc)
            log.warning(
                "cannot write to %s: %s; the incident stage waits, trying again in %.1fs",
                SILENCES_STREAM,
                exc,
                delay,
            )
            return
        self._sync_retry_at, self.sync_failure = None, None

    def sync(self) -> str:
        """Write a sync record; :meth:`synced` says when it has been read back."""
        record = new_sync_record()
        self._waiting.add(record.id)
        publish_record(self.broker, record)
        return record.id

    def synced(self, nonce: str) -> bool:
        return nonce not in self._waiting

    def service(self) -> None:
        """Fold what arrived into the book. Acks (which a stream consumer needs for
        credit) go out as one multiple ack per ACK_EVERY records, or once nothing more
        arrived: the owner loop hands over one delivery per drain, and an ack per record
        would double the cost of reading a long stream."""
        retry_at = self._sync_retry_at
        if not self.caught_up and retry_at is not None and time.monotonic() >= retry_at:
            self._catch_up()
        last: Delivery | None = None
        while self._arrived:
            delivery = self._arrived.popleft()
            self.records_read += 1
            try:
                record = decode_record(delivery.body)
            except InvalidSilence as exc:
                log.warning("skipping a record in %s: %s", SILENCES_STREAM, exc)
            else:
                if record.type == "sync":
                    if record.id in self._waiting:
                        self._waiting.discard(record.id)
                        if not self.caught_up:
                            self.caught_up = True
                            log.info("read %s: %s", SILENCES_STREAM, self._active_note())
                else:
                    self.book.apply(record)
                    self._counted_at = 0.0  # count again now
            last = delivery
        if last is not None:
            self._unacked, self._unacked_count = last, self._unacked_count + 1
        if self._unacked is not None and (last is None or self._unacked_count >= ACK_EVERY):
            self._unacked.ack(multiple=True)
            self._unacked, self._unacked_count = None, 0
        if self.metrics is not None and time.monotonic() - self._counted_at >= 1.0:
            # Also once a second: a silence ends by the clock, without a record.
            self._counted_at = time.monotonic()
            self.metrics.silences_active.set(self.book.active(datetime.now(UTC)))

    def _active_note(self) -> str:
        return f"{self.book.active(datetime.now(UTC))} active silence(s)"

    def lost(self) -> None:
        self.caught_up = False
        self._sync_retry_at = None
        self._unacked, self._unacked_count = None, 0
        self._cancel = None
        self._arrived.clear()
        self._waiting.clear()

    def read_all(self, drain: Callable[[], None], deadline: Callable[[], bool]) -> SilenceBook:
        """For the commands: start, and drain until caught up or ``deadline()``."""
        self.start()
        if self.sync_failure is not None:
            # A command does not wait for the stream to take writes again.
            raise BrokerUnavailable(f"cannot write to {SILENCES_STREAM}: {self.sync_failure}")
        while not self.caught_up:
            if deadline():
                raise BrokerUnavailable(f"timed out reading {SILENCES_STREAM}")
            drain()
            self.service()
        return self.book
