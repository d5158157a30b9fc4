"""Send stage: try every relay in ``[[smtp]]`` order until one accepts, and classify the
failure only when all of them failed. Transient failures are retried in-process
(exponential backoff with jitter, a few seconds in all).

A relay that accepts the mail for some recipients and refuses others has delivered it:
those refused with 5xx are logged and counted, those refused with 4xx (greylisting, a
full mailbox) are handed back as deferred, for the retry ladder to try again later."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared.config import SmtpRelay
from shared.errors import DeliveryError, TlsRefusedError, TransientError
from worker.classify import combine_attempts
from worker.metrics import Metrics
from worker.relay import Refusal, Relay
from worker.render import Mail

__all__ = ["Sender", "Sent"]

COOLDOWN_AFTER = 3  # consecutive failures before a relay sits out its cool-down
# Exponential backoff with jitter between in-process attempts: 0.2 s, 0.4 s, ... at most
# 2 s, each plus up to 0.3 s so that mails failing together do not retry together.
_FIRST_WAIT = 0.2
_MAX_WAIT = 2.0
_JITTER = 0.3


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sent:
    """A relay accepted the mail. ``deferred``: recipients it refused for now (4xx)."""

    relay: str
    deferred: dict[str, Refusal] = field(default_factory=dict)


class Sender:
    def __init__(
        self,
        relays: Sequence[SmtpRelay],
        metrics: Metrics,
        *,
        retry_budget: float = 5.0,
        max_attempts: int = 4,
    ):
        self.relays = [
            Relay(r, on_certificate=metrics.cert_expiry.labels(r.label).set) for r in relays
        ]
        self.metrics = metrics
        self.retry_budget = retry_budget
        self.max_attempts = max_attempts

    async def send(self, mail: Mail) -> Sent:
        """Deliver ``mail`` and say which relay took it and which recipients it deferred,
        or raise the classified :class:`DeliveryError` once retries are used up."""
        try:
            # Most mails go through at once: they should not pay for retry machinery.
            return await self._attempt(mail)
        except TransientError as first:
            if self.max_attempts <= 1:
                raise
            self._count_retry(first)
        # The rest is tenacity's: the attempts left, within the retry budget (counted from
        # the first retry, so a first attempt slow to time out still gets another try).
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            stop=stop_after_attempt(self.max_attempts - 1) | stop_after_delay(self.retry_budget),
            # Its own first pause comes after the second failure: twice the first one.
            wait=wait_exponential_jitter(multiplier=2 * _FIRST_WAIT, max=_MAX_WAIT, jitter=_JITTER),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        await asyncio.sleep(_FIRST_WAIT + random.uniform(0, _JITTER))  # noqa: S311 - jitter
        async for attempt in retrying:
            with attempt:
                return await self._attempt(mail)
        raise AssertionError("tenacity re-raises the last failure")  # pragma: no cover

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        assert isinstance(error, TransientError)
        self._count_retry(error)

    def _count_retry(self, error: TransientError) -> None:
        self.metrics.retries.labels("inprocess").inc()
        log.info("retrying in-process after %s", error)

    async def _attempt(self, mail: Mail) -> Sent:
        errors: list[DeliveryError] = []
        now = time.monotonic()
        # A relay that keeps failing sits out its cool-down, but when every relay is
        # cooling down they are all tried: skipping them all would only delay the alert.
        relays = [r for r in self.relays if not r.cooling_down(now)] or self.relays
        for relay in relays:
            started = time.monotonic()
            try:
                refused = await relay.send(mail)
            except DeliveryError as exc:
                errors.append(exc)
                if isinstance(exc, TlsRefusedError):
                    self.metrics.tls_refused.labels(exc.cause).inc()
                log.warning("event %s: relay %s failed: %s", mail.event_id, relay.label, exc)
                if not exc.about_relay:
                    relay.note_success()  # it answered: up, whatever it made of this mail
                elif relay.note_failure(time.monotonic(), COOLDOWN_AFTER):
                    log.warning(
                        "relay %s failed %d times in a row; skipping it for %.0fs",
                        relay.label,
                        COOLDOWN_AFTER,
                        relay.config.cooldown,
                    )
                continue
            relay.note_success()
            self.metrics.send_duration.labels(relay.label).observe(time.monotonic() - started)
            self.metrics.sent.labels(relay.label).inc()
            if refused:
                self.metrics.recipients_refused.inc(len(refused))
                log.warning(
                    "event %s: relay %s refused some recipients: %s",
                    mail.event_id,
                    relay.label,
                    "; ".join(
                        f"{rcpt} ({refusal.text}{', will retry' if refusal.temporary else ''})"
                        for rcpt, refusal in refused.items()
                    ),
                )
            deferred = {rcpt: r for rcpt, r in refused.items() if r.temporary}
            return Sent(relay.label, deferred)
        failure = combine_attempts(errors)
        self.metrics.failed.labels(failure.reason).inc()
        raise failure

    async def close(self) -> None:
        await asyncio.gather(*(relay.close() for relay in self.relays))
