"""The worker's stages chained for one message: decode > filter > render > send. The
result is an :class:`Outcome` that the consumer settles on the broker's thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from shared.catalog import Catalog
from shared.config import FilterConfig
from shared.errors import DeliveryError, InvalidEvent, PermanentError
from shared.event import decode_event
from shared.filter import decide
from worker.metrics import Metrics
from worker.render import Renderer
from worker.send import Sender

__all__ = ["Outcome", "Pipeline"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with the broker message. ``ack`` after a relay accepted the mail or the
    event was filtered out; ``dead_letter`` when delivery is given up, with the reason."""

    action: Literal["ack", "dead_letter"]
    reason: str | None = None
    detail: str = ""


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        filters: FilterConfig,
        renderer: Renderer,
        sender: Sender,
        metrics: Metrics,
    ):
        self.catalog = catalog
        self.filters = filters
        self.renderer = renderer
        self.sender = sender
        self.metrics = metrics

    async def handle(self, body: bytes) -> Outcome:
        self.metrics.in_flight.inc()
        try:
            return await self._handle(body)
        finally:
            self.metrics.in_flight.dec()

    async def _handle(self, body: bytes) -> Outcome:
        started = time.monotonic()
        try:
            event = decode_event(body)
        except InvalidEvent as exc:
            self.metrics.failed.labels("invalid_event").inc()
            return self._give_up(PermanentError("invalid_event", str(exc)), "?")

        decision = decide(event, self.catalog, self.filters)
        if not decision.mail:
            assert decision.reason is not None
            self.metrics.filtered.labels(decision.reason).inc()
            log.info(
                "filtered event %s %s from %s: %s", event.id, event.key, event.node, decision.why
            )
            return Outcome("ack")

        try:
            mail = self.renderer.render(event, decision)
        except Exception as exc:
            log.exception("event %s %s could not be rendered", event.id, event.key)
            self.metrics.failed.labels("render").inc()
            return self._give_up(PermanentError("render", f"{type(exc).__name__}: {exc}"), event.id)

        try:
            relay = await self.sender.send(mail)
        except DeliveryError as exc:
            return self._give_up(exc, event.id)
        latency = (datetime.now(UTC) - event.time).total_seconds()
        self.metrics.event_to_mail.observe(max(latency, 0.0))
        log.info(
            "sent event %s %s level %s from %s via %s in %.3fs",
            event.id,
            event.key,
            decision.level,
            event.node,
            relay,
            time.monotonic() - started,
        )
        return Outcome("ack")

    def _give_up(self, error: DeliveryError, event_id: str) -> Outcome:
        self.metrics.dead_lettered.labels(error.reason).inc()
        log.error("dead-lettering event %s: %s", event_id, error)
        return Outcome("dead_letter", error.reason, error.detail)
