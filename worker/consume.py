"""Consume and settle on the thread that owns the broker connection, and hand each message
to the pipeline on the asyncio loop thread.

Heartbeats are only sent while the owner thread keeps servicing the connection, so
nothing on it waits for SMTP: it drains deliveries, starts their pipelines on the loop
(a drain's worth at a time, see :mod:`worker.handoff`), and settles finished outcomes
(see docs/design.md). A fault of one
message stays that message's: a settle that is not confirmed returns only that message to
the queue, and the connection is dropped only when the broker is really gone. Every
reconnect hands all prefetched messages back to the broker, which charges each a delivery
against the work queue's delivery limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from shared.backoff import Backoff
from shared.config import BrokerConfig, BrokerUrl, IncidentConfig
from shared.notification import is_bundle
from shared.topology import WORK_QUEUE
from worker.broker import (
    Broker,
    BrokerUnavailable,
    Delivery,
    Outgoing,
    PublishNotConfirmed,
    ack_all,
)
from worker.bundle import Part, parts_of, republished, whole_deliveries
from worker.handoff import Handoff, Job
from worker.incident_stage import IncidentStage
from worker.metrics import Metrics
from worker.outcome import Acked, Outcome
from worker.pipeline import Pipeline
from worker.settle import describe_delivery, settle
from worker.silence_follow import SilenceFollower

__all__ = ["Consumer"]

log = logging.getLogger(__name__)

# How long one drain waits for a delivery or a finished mail before checking heartbeats
# and the incident stage's deadlines. A finished mail ends the wait at once (see
# worker.handoff).
_DRAIN_TIMEOUT = 0.02
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0


class Consumer:
    def __init__(
        self,
        broker: BrokerConfig,
        pipeline: Pipeline,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        prefetch: int,
        shutdown_grace: float,
        incident: IncidentConfig | None = None,
        canary_interval: float = 0.0,
    ):
        self.broker = Broker(broker)
        self.silences = SilenceFollower(self.broker, metrics)
        # The incident stage shares the connection and this thread (None: delivery only).
        self.stage = (
            None
            if incident is None
            else IncidentStage(
                self.broker,
                incident,
                pipeline.catalog,
                pipeline.filters,
                pipeline,
                metrics,
                self.silences,
                canary_interval=canary_interval,
            )
        )
        # Whether the stage should be subscribed: it waits until the silences are read.
        self._stage_wanted = False
        self.pipeline = pipeline
        self.metrics = metrics
        self.loop = loop
        self.prefetch = prefetch
        self.shutdown_grace = shutdown_grace
        self.handoff = Handoff(loop, self._handle)
        self._in_flight: set[Job] = set()  # owner thread only
        # Bundles that came back, to be split into messages of their own (see
        # worker.bundle) after the drain: a confirm wait may not run inside its callback.
        self._to_split: deque[Delivery] = deque()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting with backoff when the broker goes
        away. On stop: cancel the consumer, let in-flight mails finish within the grace
        period, settle them, and close; anything unsettled returns to the queue."""
        backoff = Backoff(_MIN_BACKOFF, _MAX_BACKOFF)
        try:
            self._run(stop, backoff)
        finally:
            self.handoff.close()

    def _run(self, stop: threading.Event, backoff: Backoff) -> None:
        while not stop.is_set():
            try:
                self.broker.connect(on_failure=_unreachable)
                log.info("connected to broker %s", self.broker.url)
                backoff.reset()
                self._consume(stop)
            except BrokerUnavailable as exc:
                self.metrics.broker_connected.set(0)
                delay = backoff.delay()
                log.warning("broker connection failed: %s; reconnecting in %.1fs", exc, delay)
                # Deliveries of the lost channel come back as redeliveries (here or to
                # another worker) and can no longer be settled here: stop their sends,
                # or each would be mailed twice.
                self._abandon_in_flight()
                if self.stage is not None:
                    self.stage.lost()
                    self.silences.lost()
                self.broker.fail_over()
                stop.wait(delay)
            finally:
                self.metrics.broker_connected.set(0)
                self.broker.close()

    def _consume(self, stop: threading.Event) -> None:
        cancel = self.broker.consume(WORK_QUEUE, self._on_message, prefetch=self.prefetch)
        if self.stage is not None:
            # The stage subscribes once every silence is known (see _drain).
            self.silences.start()
            self._stage_wanted = True
        # Only now is the worker useful: topology declared and deliveries flowing.
        self.metrics.broker_connected.set(1)
        log.info("consuming %s with prefetch %d", WORK_QUEUE, self.prefetch)
        try:
            while not stop.is_set():
                self._drain()
        except BrokerUnavailable:
            self._settle_before_leaving()
            raise
        if self.stage is not None:
            self._stage_wanted = False
            self.stage.stop()
        cancel()
        deadline = time.monotonic() + self.shutdown_grace
        if self._in_flight:
            log.info(
                "stopping: waiting up to %.0fs for %d in-flight mails",
                self.shutdown_grace,
                len(self._in_flight),
            )
        while self._in_flight and time.monotonic() < deadline:
            self._drain()
        if self._in_flight:
            log.warning(
                "stopping with %d mails unsettled; the broker will redeliver them",
                len(self._in_flight),
            )
            # Stop their sends before the channel closes and the broker hands the
            # messages to another worker, or both would mail them.
            self._abandon_in_flight()

    def _drain(self) -> None:
        self.broker.drain(_DRAIN_TIMEOUT, wake=self.handoff.wake)
        # What the drain delivered starts now, in one crossing to the loop thread.
        self.handoff.flush()
        self._split_redelivered()
        self._settle_finished()
        if self.stage is not None:
            self.silences.service()
            if self._stage_wanted and self.stage.engine is None and self.silences.caught_up:
                self.stage.start()
            self.stage.service()
        # Waits for confirms (the stage's, a retry's or a dead letter's) also take
        # deliveries: the next drain's wait must not hold them back.
        self.handoff.flush()

    def _on_message(self, delivery: Delivery) -> None:
        if is_bundle(delivery.body):
            if delivery.redelivered:
                self._to_split.append(delivery)
                return
            parts = parts_of(delivery)
            if parts is not None:
                for part in parts:
                    self._in_flight.add(self.handoff.submit(part))
                return
        self._in_flight.add(self.handoff.submit(delivery))

    def _split_redelivered(self) -> None:
        """Republish the parts of every bundle that came back, all in one confirmed
        batch (after a worker died its peers may get dozens at once), and ack each
        bundle whose parts were all confirmed; give back the others."""
        while self._to_split:
            bundles: list[tuple[Delivery, int, int]] = []  # bundle, first, end in outgoing
            outgoing: list[Outgoing] = []
            while self._to_split:
                bundle = self._to_split.popleft()
                parts = republished(bundle)
                if parts is None:  # bad framing: refused whole by the pipeline
                    self._in_flight.add(self.handoff.submit(bundle))
                    continue
                bundles.append((bundle, len(outgoing), len(outgoing) + len(parts)))
                outgoing += parts
            failures = self.broker.publish_each_confirmed(outgoing)
            for bundle, first, end in bundles:
                failed = [f for f in failures[first:end] if f]
                if failed:
                    log.error(
                        "could not split the redelivered bundle %s: %s; returning it to the queue",
                        describe_delivery(bundle),
                        failed[0],
                    )
                    bundle.requeue()
                    continue
                bundle.ack()
                log.info(
                    "split the redelivered bundle %s into its %d notifications",
                    describe_delivery(bundle),
                    end - first,
                )

    def _handle(self, delivery: Delivery) -> Coroutine[Any, Any, Outcome]:
        return self.pipeline.handle(delivery.body, delivery.headers, received=delivery.received)

    def _settle_finished(self) -> None:
        finished: list[tuple[Delivery, Outcome]] = []
        for job in self.handoff.finished():
            if job not in self._in_flight:
                continue  # delivered on a connection that is gone; it will come again
            self._in_flight.discard(job)
            delivery = job.delivery
            try:
                outcome = job.outcome()
            except Exception as exc:  # the pipeline's own failure path failed
                outcome = self.pipeline.crashed(delivery.headers, exc)
            if outcome is None:
                continue  # cancelled, left unacked: the broker gives it to the next consumer
            finished.append((delivery, outcome))
        # The mails sent first, together (a run of the oldest as one multiple ack, see
        # ack_all), so that they wait for no retry's or dead letter's confirm.
        sent = [delivery for delivery, outcome in finished if isinstance(outcome, Acked)]
        ack_all(whole_deliveries(sent))
        for delivery, outcome in finished:
            if isinstance(outcome, Acked):
                continue
            try:
                settle(self.broker, delivery, outcome)
            except PublishNotConfirmed as exc:
                # Only this message's next home failed (a nack, a refused or unconfirmed
                # publish): give back only it, and keep the channel for the others.
                log.error(
                    "could not settle %s (%s): %s; returning %s to the queue",
                    describe_delivery(delivery),
                    outcome.action,
                    exc,
                    "its bundle, once the rest of it is settled,"
                    if isinstance(delivery, Part)
                    else "it",
                )
                delivery.requeue()
                continue
            self.metrics.settled(outcome)

    def _abandon_in_flight(self) -> None:
        """Cancel the sends of messages this worker can no longer settle. A mail already
        inside DATA may still reach the relay: the redelivery then sends it again."""
        self.handoff.abandon(list(self._in_flight))
        self._in_flight.clear()
        self._to_split.clear()

    def _settle_before_leaving(self) -> None:
        """Before a reconnect: settle what already finished, if the connection still
        takes it, so that those messages are not handed back and charged again."""
        try:
            self._settle_finished()
        except BrokerUnavailable as exc:
            log.debug("could not settle finished work before reconnecting: %s", exc)


def _unreachable(url: BrokerUrl, why: str) -> None:
    log.warning("broker %s unreachable: %s", url, why)
