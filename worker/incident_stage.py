"""The incident stage on the broker's owner thread: events from ``clusteralert.incoming``
into the :class:`~worker.incident.IncidentEngine`, its notifications out to the mail
queue with publisher confirms, and the events they cover acked only after the confirm.

Every worker subscribes; the queue's single-active-consumer setting makes RabbitMQ deliver
to one of them only. AMQP 0-9-1 does not tell a consumer that it became the active one
(every subscriber gets the same consume-ok), so a worker counts as active from its first
delivery since it subscribed until it loses the channel. An engine lives exactly as long
as one subscription: its handles are deliveries of that channel and mean nothing on
another, and what it held comes back to whichever stage is active next.

Deliveries are queued by the consumer callback and offered from :meth:`IncidentStage.service`,
never inside the callback: a confirmed publish services the connection while it waits,
which may dispatch more deliveries, and the engine must not be re-entered.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from shared.backoff import Backoff
from shared.catalog import Catalog
from shared.config import FilterConfig, IncidentConfig
from shared.errors import InvalidEvent
from shared.event import Event, decode_event, routing_key
from shared.filter import Decision, decide
from shared.notification import (
    DIGEST_PREFIX,
    Notification,
    encode_bundle,
    encode_notification,
)
from shared.own_events import own_kind, worker_only
from shared.topology import INCOMING_QUEUE, WORK_QUEUE
from worker.broker import Broker, Delivery, Outgoing, PublishNotConfirmed, ack_all
from worker.canary import Canary
from worker.heartbeat import NodeHeartbeats
from worker.incident import Ack, Action, IncidentEngine, Publish, count
from worker.metrics import Metrics
from worker.pipeline import Pipeline, refuse_compressed
from worker.settle import describe_delivery, settle
from worker.silence_follow import SilenceFollower
from worker.silence_stage import SILENCE_BATCH, SilenceStep

__all__ = ["BUNDLE_CONTENT_TYPE", "IncidentStage", "bundle_size", "stage_prefetch"]

log = logging.getLogger(__name__)

# Unacked deliveries beyond max_held: room for the events the engine takes in while it
# flushes its oldest window early, so that the broker never stops delivering to it.
PREFETCH_MARGIN: Final = 100
MAX_PREFETCH: Final = 65535  # basic.qos prefetch-count is a 16-bit field
_FOLDS: Final = ("duplicate", "repeat")
# After a notification the broker refused (the mail queue full, say), the stage waits
# this long, doubling, before it offers events again. The refused events come straight
# back to it; offered at once, each would be refused again and again until the delivery
# limit sent it to the DLQ within a second.
_MIN_PAUSE: Final = 0.5
_MAX_PAUSE: Final = 30.0
# Notifications published before their confirms are waited for, at most: one broker
# round trip for many, while a refusal still stops the stage soon after it.
MAX_UNCONFIRMED: Final = 100
# A bundle's parts together at most: more would only hold up the worker that takes it.
BUNDLE_BYTES: Final = 256 * 1024
BUNDLE_CONTENT_TYPE: Final = "application/x-ndjson"


def _bundles(outgoing: list[Outgoing], most: int) -> Iterator[list[Outgoing]]:
    """``outgoing`` in order, in runs of at most ``most`` and BUNDLE_BYTES; a large one
    (a digest, say) alone, as a bundle saves a message's overhead, not its bytes."""
    chunk: list[Outgoing] = []
    size = 0
    for message in outgoing:
        length = len(message.body)
        if chunk and (len(chunk) == most or size + length > BUNDLE_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(message)
        size += length
    if chunk:
        yield chunk


def bundle_size(bundle: int, *, prefetch: int, max_hold: float, rates: Sequence[float]) -> int:
    """``[incident] bundle``, lowered where a relay's ``rate_limit`` could not send what a
    worker may hold, ``prefetch`` bundles of it, within half of ``max_hold``: the rest
    would go to the retry ladder for nothing but waiting its turn (``rates``: the relays'
    limits, 0 for none; the slowest counts, as a worker may be failed over to it)."""
    limits = [rate for rate in rates if rate > 0]
    if not limits:
        return bundle
    fits = int(min(limits) * max_hold / 2 / prefetch)
    return max(1, min(bundle, fits))


def stage_prefetch(max_held: int) -> int:
    # Silenced events wait unacked too, until their counts are recorded.
    return min(MAX_PREFETCH, max_held + PREFETCH_MARGIN + SILENCE_BATCH)


def _message_id(notification: Notification) -> str:
    first = notification.first.id
    return DIGEST_PREFIX + first if notification.kind == "digest" else first


class IncidentStage:
    """Owner thread only, like the :class:`Broker` it uses."""

    def __init__(  # noqa: PLR0917 (the stage's collaborators, each named at the call)
        self,
        broker: Broker,
        config: IncidentConfig,
        catalog: Catalog,
        filters: FilterConfig,
        pipeline: Pipeline,
        metrics: Metrics,
        silences: SilenceFollower,
        *,
        canary_interval: float = 0.0,
    ):
        self.broker = broker
        self.silences = SilenceStep(
            broker, silences, metrics, pause=self._pause_offers, resume=self._resume_offers
        )
        self.config = config
        self.catalog = catalog
        self.filters = filters
        self.pipeline = pipeline
        self.metrics = metrics
        self.engine: IncidentEngine[Delivery] | None = None
        self.active = False
        self._arrived: deque[Delivery] = deque()
        self._cancel: Callable[[], None] | None = None
        # The decision of the event being offered, so that the engine need not decide
        # it a second time.
        self._offered: tuple[Event, Decision] | None = None
        self._pause = Backoff(_MIN_PAUSE, _MAX_PAUSE)
        self._paused_until = 0.0
        self.canary = Canary(broker, metrics, canary_interval)
        self.heartbeats = NodeHeartbeats(metrics)
        # Notifications the engine gave, in order, not yet published (see _carry_out).
        self._unconfirmed: list[Publish[Delivery]] = []

    def start(self) -> None:
        """Subscribe (on a connected broker) with a fresh engine."""
        self.engine = IncidentEngine(self.config, self.catalog, self.filters, decider=self._decide)
        self._arrived.clear()
        prefetch = stage_prefetch(self.config.max_held)
        self._cancel = self.broker.consume(INCOMING_QUEUE, self._arrived.append, prefetch=prefetch)
        self.canary.restart()
        log.info("incident stage subscribed to %s with prefetch %d", INCOMING_QUEUE, prefetch)

    def stop(self) -> None:
        """Stop taking events; what the engine held stays unacked and goes, once the
        channel closes, to the next active stage. The engine goes with the channel."""
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()
        self.lost()

    def lost(self) -> None:
        """The channel is gone (or going): forget everything tied to it."""
        if self.active:
            log.info("incident stage no longer active")
        self.engine = None
        self.active = False
        self._cancel = None
        self._arrived.clear()
        self.silences.lost()
        self._unconfirmed.clear()
        self.metrics.stage_active.set(0)
        self.metrics.held.set(0)
        self.metrics.next_due.set(0)

    def service(self) -> None:
        """Offer what arrived and send what is due. Called after each drain."""
        engine = self.engine
        if engine is not None:
            self.canary.service(self.active)
        if engine is None or time.monotonic() < self._paused_until:
            return  # what arrives meanwhile waits here, unacked, charged no delivery
        while self._arrived and time.monotonic() >= self._paused_until:
            self._offer(engine, self._arrived.popleft())
            if len(self._unconfirmed) >= MAX_UNCONFIRMED:
                self._confirm()
        deadline = engine.next_deadline()
        if deadline is not None:
            now = time.monotonic()
            if deadline <= now and now >= self._paused_until:
                self._carry_out(engine.tick(now))
                deadline = engine.next_deadline()
        self._confirm()
        if self.active:
            self.silences.service(active=True)
        self.metrics.held.set(engine.held)
        # As wall-clock time, so that an alert sees a deadline long past even when this
        # thread stopped updating it.
        due = 0.0 if deadline is None else time.time() + deadline - time.monotonic()
        self.metrics.next_due.set(due)

    def _decide(self, event: Event, catalog: Catalog, filters: FilterConfig) -> Decision:
        if self._offered is not None and self._offered[0] is event:
            return self._offered[1]
        return decide(event, catalog, filters)

    def _offer(self, engine: IncidentEngine[Delivery], delivery: Delivery) -> None:
        if not self.active:
            self.active = True
            self.metrics.stage_active.set(1)
            log.info("incident stage active: this worker groups the events of %s", INCOMING_QUEUE)
        try:
            refuse_compressed(delivery.headers)
            event = decode_event(delivery.body)
        except InvalidEvent as exc:
            self.metrics.consumed.inc()
            self._dead_letter(delivery, exc)
            return
        if self._take_own(event, delivery):
            return
        decision = decide(event, self.catalog, self.filters)
        self.pipeline.note_decision(event, decision)
        if self.silences.take(event, decision, delivery):
            entry = decision.entry
            if entry is not None and entry.resolves and decision.reason != "disabled":
                # Not mailed, but the incident it ends is over all the same: its next
                # failure is a new one, mailed, not a repeat folded into it.
                engine.end_quietly(event, entry, now=time.monotonic())
            return
        self._offered = (event, decision)
        try:
            actions = engine.offer(event, delivery, now=time.monotonic())
        finally:
            self._offered = None
        for action in actions:
            if (
                isinstance(action, Ack)
                and action.handle is delivery
                and action.reason not in _FOLDS
            ):
                self.pipeline.note_filtered(event, decision)
        self._carry_out(actions)

    def _take_own(self, event: Event, delivery: Delivery) -> bool:
        """The pipeline's own events skip the filter and the engine (README, "Watching
        the pipeline itself"); True when ``event`` was one and is settled."""
        kind = own_kind(event)
        if kind is None:
            return False  # every ordinary event: nothing more to look up
        if worker_only(event) and delivery.routing_key != routing_key(event):
            # Only workers may publish under the canary's and the probe's keys, so the
            # same body under another key came from someone else: a forged canary would
            # tell the operator the mail path works when nobody checked it.
            self.metrics.consumed.inc()
            self._dead_letter(
                delivery,
                InvalidEvent(
                    f"a {kind} under the routing key {delivery.routing_key[:80]!r}, not its "
                    "own: only workers send these"
                ),
            )
            return True
        if kind == "canary":
            self.canary.forward(event, delivery)
        elif kind == "heartbeat":
            self.heartbeats.seen(event)
            delivery.ack()
        elif kind == "probe":
            delivery.ack()
        return True

    def _dead_letter(self, delivery: Delivery, exc: InvalidEvent) -> None:
        self._confirm()  # in order: what came before it first
        outcome = self.pipeline.undecodable(delivery.headers, exc)
        try:
            settle(self.broker, delivery, outcome)
        except PublishNotConfirmed as failed:
            # As the delivery stage says it. No pause: the queue's delivery limit ends
            # this sooner, and the broker's own dead-lettering keeps it.
            log.error(
                "could not settle %s (%s): %s; returning it to the queue",
                describe_delivery(delivery),
                outcome.action,
                failed,
            )
            delivery.requeue()
            return
        self.metrics.settled(outcome)

    def _carry_out(self, actions: list[Action[Delivery]]) -> None:
        """In order. A notification is only published here, and confirmed with those
        published after it by :meth:`_confirm`, before any ack that follows it and at
        the end of each service: one broker round trip for the lot, not one each."""
        for action in actions:
            if isinstance(action, Ack):
                self._confirm()
                action.handle.ack()
                count(self.metrics, action)
                # Its last stop (see Pipeline: the delivery stage counts the others).
                self.metrics.consumed.inc()
                if action.reason in _FOLDS:
                    log.info("folded %s (%s)", describe_delivery(action.handle), action.reason)
            else:
                self._unconfirmed.append(action)

    def _confirm(self) -> None:
        """Publish the notifications not yet published, wait for their confirms, and only
        then ack the events each covers; those of a notification not confirmed go back
        to the queue, and the stage pauses."""
        actions, self._unconfirmed = self._unconfirmed, []
        published: list[Publish[Delivery]] = []
        outgoing: list[Outgoing] = []
        refused = False
        for action in actions:
            try:
                body = encode_notification(action.notification)
            except InvalidEvent as exc:
                self._refused(action, exc)
                refused = True
                continue
            properties = {
                "delivery_mode": 2,
                "content_type": "application/json",
                "message_id": _message_id(action.notification),
            }
            outgoing.append(Outgoing(body, properties, "", WORK_QUEUE))
            published.append(action)
        failures = self._publish(outgoing)
        confirmed: list[Delivery] = []
        for action, failure in zip(published, failures, strict=True):
            if failure is not None:
                self._refused(action, PublishNotConfirmed(f"publish to {WORK_QUEUE} {failure}"))
                refused = True
                continue
            confirmed.extend(action.handles)
            count(self.metrics, action)
            if log.isEnabledFor(logging.DEBUG):  # summary() is not free: only when shown
                # The delivery stage's "sent event" line is the one line per outcome.
                log.debug(
                    "published %s, first event %s",
                    action.notification.summary(),
                    action.notification.first.id,
                )
        # Together: one ack for a run of the oldest events, not one per event, and none
        # that reaches an event the engine still holds.
        ack_all(confirmed)
        if refused:
            self._pause_offers()
        elif published:
            self._resume_offers()

    def _publish(self, outgoing: list[Outgoing]) -> list[str | None]:
        """Publish ``outgoing`` with confirms, as bundles where several are small (see
        :class:`~shared.notification.Bundle`); why not, per notification, as
        :meth:`Broker.publish_each_confirmed` says it per message."""
        messages: list[Outgoing] = []
        sizes: list[int] = []  # notifications per message
        for chunk in _bundles(outgoing, self.config.bundle):
            if len(chunk) == 1:
                messages.append(chunk[0])
            else:
                body = encode_bundle([(o.properties["message_id"], o.body) for o in chunk])
                properties = {**chunk[0].properties, "content_type": BUNDLE_CONTENT_TYPE}
                messages.append(Outgoing(body, properties, "", WORK_QUEUE))
            sizes.append(len(chunk))
        failures: list[str | None] = []
        for size, failure in zip(sizes, self.broker.publish_each_confirmed(messages), strict=True):
            failures += [failure] * size
        return failures

    def _refused(self, action: Publish[Delivery], exc: Exception) -> None:
        """Not certainly in the mail queue: the events go back, to be grouped again (the
        queue's delivery limit ends a loop)."""
        notification = action.notification
        log.error(
            "could not publish %s (event %s): %s; returning its %d event(s) to %s",
            notification.summary(),
            notification.first.id,
            exc,
            len(action.handles),
            INCOMING_QUEUE,
        )
        for handle in action.handles:
            handle.requeue()

    def _pause_offers(self) -> None:
        """After a write the broker did not confirm: the events it returned to the queue
        come straight back, so wait (doubling) before offering any."""
        pause = self._pause.delay()
        self._paused_until = time.monotonic() + pause
        log.warning("incident stage pausing %.1fs before it offers events again", pause)

    def _resume_offers(self) -> None:
        self._pause.reset()
