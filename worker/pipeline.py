"""The worker's stages chained for one message: decode > filter > render > send. The
result is an :class:`Outcome` that the settle stage carries out on the broker's thread.

Every outcome is logged as one line with the event id, its module:event key, the attempt
and the latency, so an operator can follow one alert through the logs.

Recipients a relay refused for now (4xx) while it took the mail for others get a copy of
their own on the retry ladder, addressed to them alone (see :mod:`worker.retry_policy`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from shared.catalog import Catalog
from shared.config import FilterConfig
from shared.errors import (
    DeliveryError,
    InvalidEvent,
    MessageFailure,
    TransientError,
    UnusableEvent,
    WorkerCrash,
    describe,
)
from shared.event import Event, decode_event
from shared.filter import Decision, decide
from shared.notification import (
    Notification,
    decode_notification,
    is_bundle,
    is_notification,
    split_bundle,
)
from shared.own_events import OwnKind, own_kind
from worker.metrics import Metrics
from worker.outcome import Acked, DeadLetter, Outcome, Retry
from worker.render import Mail, Renderer
from worker.retry_policy import (
    HEADER_REPLAYED,
    GiveUp,
    RetryState,
    decide_failure,
    failure_headers,
)
from worker.send import Sender, Sent

__all__ = ["Pipeline", "refuse_compressed"]

MAX_EXPLAINED = 1000  # bounded: a flood of made-up kinds must not grow memory

log = logging.getLogger(__name__)


def refuse_compressed(headers: Mapping[str, object]) -> None:
    """Events travel as plain JSON. A body the sender compressed (kombu's ``compression``
    header) is refused unread: inflating it has no size limit, so a small message could
    take all the worker's memory."""
    if "compression" in headers:
        what = str(headers["compression"])[:40]
        raise InvalidEvent(f"compressed bodies are not accepted (compression {what!r})")


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        filters: FilterConfig,
        renderer: Renderer,
        sender: Sender,
        metrics: Metrics,
        *,
        retry_window: timedelta = timedelta(hours=1),
        max_hold: float = 600.0,
        worker_name: str = "",
        scrub: Callable[[str], str] = lambda text: text,
        canary_to: tuple[str, ...] = (),
    ):
        self.catalog = catalog
        self.filters = filters
        self.renderer = renderer
        self.sender = sender
        self.metrics = metrics
        self.retry_window = retry_window
        self.max_hold = max_hold
        self.worker_name = worker_name
        self.scrub = scrub
        self.canary_to = canary_to
        self._canary_time = 0.0  # the newest mailed canary's own time
        # Kinds already explained at warning level: one line per kind, not per event.
        self._unknown_explained: set[str] = set()

    def _explain_unknown(self, key: str, why: str) -> None:
        """The first unknown kind that is filtered says, once, why and what to do: an
        operator whose alerts silently never arrive needs this more than a counter."""
        if key in self._unknown_explained or len(self._unknown_explained) >= MAX_EXPLAINED:
            return
        self._unknown_explained.add(key)
        log.warning(
            "%s; its events are counted but not mailed. To mail them, add %s to a catalog "
            "([catalog] path), list it in [filter] enable, or lower [filter] unknown",
            why,
            key,
        )

    async def handle(
        self,
        body: bytes,
        headers: Mapping[str, object] | None = None,
        *,
        received: float | None = None,
    ) -> Outcome:
        """The outcome for one message. ``received`` (a :func:`time.monotonic` time,
        default now) is when the worker got it: a mail not sent within ``max_hold`` of it
        goes to the retry ladder rather than holding the message any longer."""
        self.metrics.in_flight.inc()
        try:
            arrival = time.monotonic() if received is None else received
            return await self._handle(body, headers or {}, arrival)
        except Exception as exc:
            return self.crashed(headers or {}, exc)
        finally:
            self.metrics.in_flight.dec()

    def crashed(self, headers: Mapping[str, object], exc: Exception) -> Outcome:
        """A bug of ours took this message down: dead-letter it like any failure, with
        reason ``crash``. Unacked it would hold a prefetch slot; requeued it could loop
        (the broker's delivery limit backs this up for what crashes the process)."""
        log.error("unexpected error handling a message; dead-lettering it", exc_info=exc)
        self.metrics.failed.labels("crash").inc()
        error = WorkerCrash(f"{type(exc).__name__}: {describe(exc)}")
        return self._fail(error, None, RetryState.from_headers(headers), headers)

    def undecodable(
        self, headers: Mapping[str, object], exc: InvalidEvent, state: RetryState | None = None
    ) -> Outcome:
        """A message that is no event (nor notification): dead-letter it at once, with
        reason ``invalid_event``, counted. The incident stage refuses its own the same way."""
        self.metrics.failed.labels("invalid_event").inc()
        state = RetryState.from_headers(headers) if state is None else state
        return self._fail(UnusableEvent("invalid_event", str(exc)), None, state, headers)

    def note_decision(self, event: Event, decision: Decision) -> None:
        """Count and log what the filter said of an event not in the catalog."""
        if decision.entry is None:
            self.metrics.unknown.inc()
            if decision.mail:
                log.info("event %s %s is not in the catalog: %s", event.id, event.key, decision.why)

    def note_filtered(self, event: Event, decision: Decision) -> None:
        """Log a filtered event (the caller counts it)."""
        if decision.reason == "unknown":
            self._explain_unknown(event.key, decision.why)
        log.info("filtered event %s %s from %s: %s", event.id, event.key, event.node, decision.why)

    async def _handle(self, body: bytes, headers: Mapping[str, object], received: float) -> Outcome:
        started = time.monotonic()
        state = RetryState.from_headers(headers)
        if HEADER_REPLAYED in headers and state.attempts == 0:
            self.metrics.replayed.inc()
        try:
            refuse_compressed(headers)
            # A notification from the incident stage, or a bare event: a 0.1 message, or
            # a 0.1 dead letter replayed, which takes the path it took before incidents.
            # decode_event checks the size before it reads anything.
            if is_bundle(body):
                # Bundles are split on the way in (worker.bundle); one whole here has
                # framing the split refused.
                split_bundle(body)
                raise InvalidEvent("bundle: not split before it was handled")
            decoded: Event | Notification = (
                decode_notification(body) if is_notification(body) else decode_event(body)
            )
        except InvalidEvent as exc:
            self.metrics.consumed.inc()
            return self.undecodable(headers, exc, state)
        own = None if isinstance(decoded, Notification) else own_kind(decoded)
        if own is not None:
            # The pipeline's own: never counted as events, never filtered or routed.
            assert isinstance(decoded, Event)
            return await self._own(decoded, own, state, headers, received, started)
        # Counted where an event is taken for the last time: here for the events a
        # notification covers (the incident stage counts those it settles itself). A
        # silence's summary covers none: its event is the stage's own, and the events it
        # reports were counted when they were held back.
        if not (isinstance(decoded, Notification) and decoded.kind == "silence"):
            self.metrics.consumed.inc(decoded.events if isinstance(decoded, Notification) else 1)

        if isinstance(decoded, Notification):
            # Filtered by the incident stage already: never again here.
            event = decoded.first
            level = self.decider(event).level
            try:
                mail = self.renderer.render_notification(decoded, self.decider)
            except Exception as exc:
                return self._unrenderable(exc, event, state, headers)
        else:
            event = decoded
            decision = decide(event, self.catalog, self.filters)
            self.note_decision(event, decision)
            if not decision.mail:
                assert decision.reason is not None
                self.metrics.filtered.labels(decision.reason).inc()
                self.note_filtered(event, decision)
                return Acked()
            level = decision.level
            try:
                mail = self.renderer.render(event, decision)
            except Exception as exc:
                return self._unrenderable(exc, event, state, headers)

        return await self._send(mail, event, level, state, headers, received, started)

    async def _own(  # noqa: PLR0917 (one message's state, passed on from _handle)
        self,
        event: Event,
        kind: OwnKind,
        state: RetryState,
        headers: Mapping[str, object],
        received: float,
        started: float,
    ) -> Outcome:
        """A canary is mailed to ``[canary] to`` and nobody else; a heartbeat or probe
        here (a replayed dead letter, say) is acked: neither is ever mailed."""
        if kind != "canary":
            log.info("event %s %s is not mailed (a %s); acked", event.id, event.key, kind)
            return Acked()
        if not self.canary_to:
            log.warning("canary %s acked unmailed: [canary] to is not set here", event.id)
            return Acked()
        decision = Decision(True, "info", None, None, "the canary")
        try:
            mail = self.renderer.render(event, decision, to=self.canary_to)
        except Exception as exc:
            return self._unrenderable(exc, event, state, headers)
        return await self._send(mail, event, "info", state, headers, received, started, canary=True)

    async def _send(  # noqa: PLR0917 (one message's state, passed on from _handle)
        self,
        mail: Mail,
        event: Event,
        level: str,
        state: RetryState,
        headers: Mapping[str, object],
        received: float,
        started: float,
        *,
        canary: bool = False,
    ) -> Outcome:
        if state.recipients is not None:
            narrowed = _still_to_reach(mail, state.recipients)
            if narrowed is None:
                return Acked()
            mail = narrowed

        budget = asyncio.timeout(received + self.max_hold - time.monotonic())
        try:
            async with budget:
                sent = await self.sender.send(mail)
        except DeliveryError as exc:
            return self._fail(exc, event, state, headers)
        except TimeoutError:
            if not budget.expired():
                raise
            # Waiting longer (for a relay slot, the rate limit, a slow relay) would risk
            # the broker's consumer ack timeout, which returns every message in flight.
            late = TransientError(
                "timeout", f"not delivered within {self.max_hold:g}s of reaching the worker"
            )
            self.metrics.failed.labels("timeout").inc()
            return self._fail(late, event, state, headers)
        latency = (datetime.now(UTC) - event.time).total_seconds()
        self.metrics.event_to_mail.observe(max(latency, 0.0))
        log.info(
            "sent event %s %s level %s from %s via %s%s, attempt %d, in %.3fs "
            "(%.3fs after the event)",
            event.id,
            event.key,
            level,
            event.node,
            sent.relay,
            f" to {len(mail.recipients) - len(sent.deferred)} of {len(mail.recipients)}"
            if sent.deferred
            else "",
            state.attempts + 1,
            time.monotonic() - started,
            latency,
        )
        if canary:
            # A relay accepted it: the whole path, exchange to relay, worked when the
            # canary was sent. Its own time, not now: one that waited in the retry ladder
            # or was replayed from the DLQ must not make a path broken since look fine,
            # nor an older one move the time back (a clock ahead of ours counts as now).
            sent_at = min(event.time.timestamp(), time.time())
            if sent_at > self._canary_time:
                self._canary_time = sent_at
                self.metrics.canary_success.set(sent_at)
        if sent.deferred:
            return self._defer(sent, event, state, headers)
        return Acked()

    def decider(self, event: Event) -> Decision:
        return decide(event, self.catalog, self.filters)

    def _unrenderable(
        self, exc: Exception, event: Event, state: RetryState, headers: Mapping[str, object]
    ) -> Outcome:
        log.error("event %s %s could not be rendered", event.id, event.key, exc_info=exc)
        self.metrics.failed.labels("render").inc()
        error = UnusableEvent("render", f"{type(exc).__name__}: {exc}")
        return self._fail(error, event, state, headers)

    def _defer(
        self, sent: Sent, event: Event, state: RetryState, headers: Mapping[str, object]
    ) -> Outcome:
        """A copy for the recipients refused for now, through the retry ladder (or the DLQ
        once the window is over) like any transient failure."""
        detail = "; ".join(f"{rcpt}: {r.text}" for rcpt, r in sent.deferred.items())
        error = TransientError("rejected_4xx", f"recipients refused for now: {detail}")
        return self._fail(error, event, state, headers, recipients=tuple(sent.deferred))

    def _fail(
        self,
        error: MessageFailure,
        event: Event | None,
        state: RetryState,
        headers: Mapping[str, object],
        recipients: tuple[str, ...] | None = None,
    ) -> Outcome:
        now = datetime.now(UTC)
        step = decide_failure(error, state, now, self.retry_window)
        detail = self.scrub(error.detail)
        updated = failure_headers(
            headers,
            error,
            state=state,
            now=now,
            worker=self.worker_name,
            detail=detail,
            recipients=recipients,
        )
        if event is not None:
            what = f"event {event.id} {event.key}"
        else:
            what = "a message" if isinstance(error, WorkerCrash) else "undecodable event"
        if isinstance(step, GiveUp):
            log.error(
                "dead-lettering %s after %d attempt(s): %s: %s",
                what,
                state.attempts + 1,
                error.reason,
                detail,
            )
            return DeadLetter(step.reason, updated)
        log.warning(
            "retry scheduled for %s in %s (attempt %d failed: %s: %s)",
            what,
            step.rung,
            state.attempts + 1,
            error.reason,
            detail,
        )
        return Retry(step.rung, error.reason, updated)


def _still_to_reach(mail: Mail, remaining: tuple[str, ...]) -> Mail | None:
    """``mail`` addressed only to the recipients a retry copy names, or None when none of
    them is a recipient any more. The header can only narrow what the config chose: a
    recipient it names that the config does not (changed config, or a forged header) is
    left out, as no event may choose where mail goes."""
    wanted = set(remaining)
    kept = tuple(r for r in mail.recipients if r in wanted)
    dropped = sorted(wanted.difference(mail.recipients))
    if dropped:
        log.warning(
            "event %s: not sending to %s: not a recipient of this event under the config",
            mail.event_id,
            ", ".join(repr(a) for a in dropped)[:500],  # header text: repr shows it safely
        )
    if not kept:
        log.info("event %s: none of its remaining recipients is configured; done", mail.event_id)
        return None
    return replace(mail, recipients=kept)
