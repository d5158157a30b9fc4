"""The silence step of the incident stage: after the filter, before grouping (README,
"Silences"). Owner thread only.

A silenced event is not mailed, and not forgotten either: its count (per silence,
cluster, kind and node, with the first and last time) goes into a ``held`` record in the
silences stream, and the event is acked only once that record is confirmed. Events wait
unacked for at most FLUSH_INTERVAL or SILENCE_BATCH of them, so one record covers many;
if the worker dies meanwhile they come back to the next active stage, which counts them
again. The counts therefore live in RabbitMQ, not in any worker, and whichever stage is
active when the silence ends mails the summary from them.

Ending a silence: once the active stage sees one ended (its end time passed, or an
``expire`` record) that no ``summarised`` record covers, it writes its pending counts,
then a sync record, and when it reads that back (every count written before is in its
book) it publishes the summary to the mail queue with a confirm, then records
``summarised``. A stage that dies between the two makes the next one send it again,
with the same Message-ID.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from shared.event import Event
from shared.filter import Decision
from shared.notification import encode_notification
from shared.silence import HeldRow, held_record, summarised_record
from shared.topology import WORK_QUEUE
from worker.broker import Broker, Delivery, PublishNotConfirmed
from worker.metrics import Metrics
from worker.silence_follow import SilenceFollower, publish_record
from worker.silence_summary import summary

__all__ = ["FLUSH_INTERVAL", "SILENCE_BATCH", "SilenceStep"]

log = logging.getLogger(__name__)

SILENCE_BATCH: Final = 500
FLUSH_INTERVAL: Final = 1.0
# After a failed record or summary publish: try again this much later, not at every
# drain (each attempt would write a sync record).
_RETRY_AFTER: Final = 5.0

RowKey = tuple[str, str, str]


def silenceable(decision: Decision) -> bool:
    """Whether a silence may take the event: one the filter lets through, or one that
    ends an incident (the engine takes those even with their mail flag off). What the
    filter drops stays counted as filtered."""
    if decision.mail:
        return True
    entry = decision.entry
    return entry is not None and bool(entry.resolves) and decision.reason != "disabled"


class SilenceStep:
    def __init__(
        self,
        broker: Broker,
        follower: SilenceFollower,
        metrics: Metrics,
        *,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
    ):
        self.broker = broker
        self.follower = follower
        self.metrics = metrics
        # The stage's own pause (see IncidentStage): after a failed write of counts, the
        # requeued events come straight back; taken at once, each write would fail again
        # and each return charge them a delivery, until the queue's limit dead-letters
        # them. ``resume`` after a write that succeeded.
        self._pause = pause
        self._resume = resume
        self._rows: dict[str, dict[RowKey, HeldRow]] = {}
        self._handles: list[Delivery] = []
        self._oldest = 0.0
        self._barrier: tuple[str, list[str]] | None = None
        self._sent: set[str] = set()  # summaries this worker sent (until read back)
        self._retry_at = 0.0

    @property
    def waiting(self) -> int:
        """Silenced events not yet recorded (and so not acked)."""
        return len(self._handles)

    def take(self, event: Event, decision: Decision, delivery: Delivery) -> bool:
        """Silence ``event`` if an active silence covers it: True when it did."""
        if not silenceable(decision):
            return False
        silence = self.follower.book.silencing(event, datetime.now(UTC))
        if silence is None:
            return False
        rows = self._rows.setdefault(silence.id, {})
        key = (event.cluster, event.key, event.node)
        row = HeldRow.of(event)
        old = rows.get(key)
        rows[key] = row if old is None else old.merged(row)
        if not self._handles:
            self._oldest = time.monotonic()
        self._handles.append(delivery)
        log.debug(
            "silenced event %s %s from %s (silence %s)", event.id, event.key, event.node, silence.id
        )
        if len(self._handles) >= SILENCE_BATCH and time.monotonic() >= self._retry_at:
            self.flush()
        return True

    def flush(self) -> bool:
        """Record the pending counts, then ack their events. False if the broker did
        not confirm: the events go back to the queue, to be counted again."""
        if not self._handles:
            return True
        rows, handles = self._rows, self._handles
        self._rows, self._handles = {}, []
        try:
            for silence_id, held in rows.items():
                publish_record(self.broker, held_record(silence_id, held.values()))
        except PublishNotConfirmed as exc:
            log.error(
                "could not record %d silenced event(s): %s; returning them to the queue",
                len(handles),
                exc,
            )
            for handle in handles:
                handle.requeue()
            self._retry_at = time.monotonic() + _RETRY_AFTER
            self._pause()
            return False
        self._resume()
        for handle in handles:
            handle.ack()
        self.metrics.silenced.inc(len(handles))
        self.metrics.consumed.inc(len(handles))
        for silence_id, held in rows.items():
            log.info(
                "silence %s held back %d event(s)",
                silence_id,
                sum(row.count for row in held.values()),
            )
        return True

    def service(self, *, active: bool) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        if self._handles and now - self._oldest >= FLUSH_INTERVAL:
            self.flush()
        if active:
            self._summarise()

    def _summarise(self) -> None:
        book = self.follower.book
        if self._barrier is None:
            ended = [
                s.id for s in book.ended_unsummarised(datetime.now(UTC)) if s.id not in self._sent
            ]
            if not ended or not self.flush():
                return
            try:
                self._barrier = (self.follower.sync(), ended)
            except PublishNotConfirmed as exc:
                log.error("could not write a sync record before a silence summary: %s", exc)
                self._retry_at = time.monotonic() + _RETRY_AFTER
            return
        nonce, ids = self._barrier
        if not self.follower.synced(nonce):
            return
        self._barrier = None
        for silence_id in ids:
            if book.summarised(silence_id):
                continue  # another stage sent it meanwhile
            try:
                self._send_summary(silence_id)
            except PublishNotConfirmed as exc:
                log.error("could not send the summary of silence %s: %s", silence_id, exc)
                self._retry_at = time.monotonic() + _RETRY_AFTER
                return

    def _send_summary(self, silence_id: str) -> None:
        book = self.follower.book
        rows = book.held(silence_id)
        if not rows:
            # Nothing to tell: no mail, only the record, so no other stage mails it.
            log.info("silence %s ended; it held back nothing, so no summary is mailed", silence_id)
            publish_record(self.broker, summarised_record(silence_id))
            self._sent.add(silence_id)
            return
        try:
            notification = summary(
                book.silence(silence_id),
                rows,
                ended=book.end(silence_id),
                expired_by=book.expired_by(silence_id),
            )
            body = encode_notification(notification)
        except Exception as exc:
            # The records are anyone's with write access to the stream, and every worker
            # that becomes active would meet this one: skip it (once per worker), never
            # let it stop the stage.
            log.warning(
                "skipping the summary of silence %s: %s: %s",
                silence_id,
                type(exc).__name__,
                str(exc)[:200],
            )
            self._sent.add(silence_id)
            return
        self.broker.publish_confirmed(
            body,
            {
                "delivery_mode": 2,
                "content_type": "application/json",
                "message_id": notification.first.id,
            },
            "",
            WORK_QUEUE,
        )
        self._sent.add(silence_id)
        log.info(
            "silence %s ended; summary of %d held-back event(s) sent",
            silence_id,
            sum(row.count for row in rows),
        )
        publish_record(self.broker, summarised_record(silence_id))

    def lost(self) -> None:
        """The channel is gone: its unacked events come back anyway."""
        self._rows, self._handles = {}, []
        self._barrier = None
