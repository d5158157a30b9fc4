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


def _wait(failed: int) -> float:
    """The pause after the ``failed``-th failed attempt."""
    jitter = random.uniform(0, _JITTER)  # noqa: S311 - jitter, not secrets
    return min(_FIRST_WAIT * 2.0 ** (failed - 1) + jitter, _MAX_WAIT)


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
        started = time.monotonic()
        failed = 0
        while True:
            try:
                # A plain loop, no retry library: most mails go through at once, and
                # they should not pay for retry machinery.
                return await self._attempt(mail)
            except TransientError as exc:
                failed += 1
                # The budget counts from the second failure on: a first attempt that
                # alone outlasts it (a relay slow to time out) still gets one more try.
                out_of_time = failed > 1 and time.monotonic() - started >= self.retry_budget
                if failed >= self.max_attempts or out_of_time:
                    raise
                self._count_retry(exc)
                await asyncio.sleep(_wait(failed))

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
                if relay.note_failure(time.monotonic(), COOLDOWN_AFTER):
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
