"""The canary, on the incident stage: every ``[canary] interval`` seconds the active
stage publishes a canary event into ``clusteralert.events``. It comes back through
``clusteralert.incoming`` like any event, and the stage then passes it, as it is, to the
mail queue, where a delivery stage mails it to ``[canary] to`` (see
:class:`~worker.pipeline.Pipeline`). So the mail proves the whole path works: exchange,
incoming queue, active stage, mail queue, a worker, a relay.

A worker cannot tell from AMQP that its stage became the active one until a delivery
arrives, and on an idle deployment none might. So a stage that has not seen one
publishes a probe instead, every interval: the active stage takes it, acks it unmailed,
and so learns that it is active (and starts the canary) even when no cluster sends
anything.
"""

from __future__ import annotations

import logging
import time

from shared.event import Event, encode_event, routing_key
from shared.own_events import canary_event, probe_event
from shared.topology import EVENTS_EXCHANGE, WORK_QUEUE
from worker.broker import Broker, Delivery, PublishNotConfirmed
from worker.metrics import Metrics

__all__ = ["Canary"]

log = logging.getLogger(__name__)


def _properties(event: Event) -> dict[str, object]:
    return {"delivery_mode": 2, "content_type": "application/json", "message_id": event.id}


class Canary:
    """Owner thread only, like the stage and broker it serves. ``interval`` 0: off."""

    def __init__(self, broker: Broker, metrics: Metrics, interval: float):
        self.broker = broker
        self.metrics = metrics
        self.interval = interval
        self._next = 0.0
        self._was_active = False
        # For the stale-canary alert, which waits for a few missed intervals.
        metrics.canary_interval.set(interval)

    def restart(self) -> None:
        """A new subscription: send (a probe, as nothing has arrived yet) at once."""
        self._next = time.monotonic()
        self._was_active = False

    def service(self, active: bool) -> None:
        """Publish the canary (active) or a probe (not known to be active) when due."""
        now = time.monotonic()
        if active and not self._was_active:
            # Just became active: the first canary now, not an interval after the probe.
            self._next = now
        self._was_active = active
        if not self.interval or now < self._next:
            return
        self._next = now + self.interval
        event = canary_event() if active else probe_event()
        try:
            self.broker.publish_confirmed(
                encode_event(event), _properties(event), EVENTS_EXCHANGE, routing_key(event)
            )
        except PublishNotConfirmed as exc:
            # The next interval brings a fresh one; a stale canary proves nothing.
            log.warning("could not publish the %s: %s", event.source, exc)
            return
        if active:
            self.metrics.canaries_published.inc()
            log.info("published canary %s", event.id)

    def forward(self, event: Event, delivery: Delivery) -> None:
        """A canary back from the incoming queue: on to the mail queue as it is, then acked.
        Never grouped, folded, silenced or counted in a storm: it must reach a relay."""
        try:
            self.broker.publish_confirmed(delivery.body, _properties(event), "", WORK_QUEUE)
        except PublishNotConfirmed as exc:
            # Dropped rather than returned: a canary that cannot reach the mail queue now
            # is no use later, and the stale canary alert tells the operator.
            log.warning("could not pass canary %s to %s: %s; dropped", event.id, WORK_QUEUE, exc)
        delivery.ack()
