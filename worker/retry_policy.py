"""What happens to a message whose delivery failed: retry later, or give up.

A small pure function over the failure and the message's retry headers, so the whole
policy can be read, and tested, in one place. Transient failures climb the ladder of
retry queues (fixed TTLs, see :mod:`shared.topology`) until the retry window since the
first failure is used up; everything else is dead-lettered at once.

A copy that carries ``x-clusteralert-recipients`` is for those recipients only: the
relay took the mail for the others and refused these for now (4xx). The header travels
with the copy up the ladder, into the DLQ and back out on replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from shared.errors import MessageFailure, TransientError
from shared.topology import RETRY_DELAYS

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_CAUSE",
    "HEADER_FIRST_FAILURE",
    "HEADER_LAST_ERROR",
    "HEADER_LAST_FAILURE",
    "HEADER_PREFIX",
    "HEADER_REASON",
    "HEADER_RECIPIENTS",
    "HEADER_REPLAYED",
    "HEADER_WORKER",
    "GiveUp",
    "NextRung",
    "RetryState",
    "decide_failure",
    "failure_headers",
    "without_broker_headers",
]

HEADER_PREFIX: Final = "x-clusteralert-"
HEADER_ATTEMPTS: Final = HEADER_PREFIX + "attempts"
HEADER_FIRST_FAILURE: Final = HEADER_PREFIX + "first-failure"
HEADER_LAST_FAILURE: Final = HEADER_PREFIX + "last-failure"
HEADER_REASON: Final = HEADER_PREFIX + "reason"
HEADER_CAUSE: Final = HEADER_PREFIX + "tls-cause"
HEADER_LAST_ERROR: Final = HEADER_PREFIX + "last-error"
HEADER_WORKER: Final = HEADER_PREFIX + "worker"
HEADER_REPLAYED: Final = HEADER_PREFIX + "replayed"
HEADER_RECIPIENTS: Final = HEADER_PREFIX + "recipients"
_BROKER_HEADERS: Final = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def without_broker_headers(headers: Mapping[str, object] | None) -> dict[str, object]:
    """The headers minus the broker's own bookkeeping (x-death, x-first-death-*,
    x-delivery-count), which would grow with every trip through the ladder or the DLQ."""
    return {k: v for k, v in (headers or {}).items() if not k.startswith(_BROKER_HEADERS)}


@dataclass(frozen=True, slots=True)
class RetryState:
    """What the message's headers say about earlier failed rounds."""

    attempts: int = 0
    first_failure: datetime | None = None
    # The recipients still to be reached, or None for all the event's recipients.
    recipients: tuple[str, ...] | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, object] | None) -> RetryState:
        headers = headers or {}
        attempts = headers.get(HEADER_ATTEMPTS, 0)
        first = headers.get(HEADER_FIRST_FAILURE)
        first_failure = None
        if isinstance(first, str):
            try:
                first_failure = datetime.fromisoformat(first).astimezone(UTC)
            except ValueError:
                first_failure = None
        # Headers are broker data: a garbled one must not stop the retry logic.
        good_attempts = attempts if isinstance(attempts, int) and attempts >= 0 else 0
        return cls(good_attempts, first_failure, _recipients(headers.get(HEADER_RECIPIENTS)))


def _recipients(value: object) -> tuple[str, ...] | None:
    """The recipients header as addresses. An unreadable one counts as absent: sending
    to every recipient again risks a duplicate, not a lost alert."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    addresses = tuple(a.strip() for a in value.split(",") if a.strip())
    return addresses or None


# The policy's verdict, before the pipeline turns it into an outcome (worker.outcome)
# with the message's headers.


@dataclass(frozen=True, slots=True)
class NextRung:
    rung: str  # routing key on clusteralert.retry, e.g. "30s"; its TTL is in RETRY_DELAYS


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


def decide_failure(
    error: MessageFailure, state: RetryState, now: datetime, window: timedelta
) -> NextRung | GiveUp:
    """Retry a transient failure on the next rung while the window since the first
    failure lasts; dead-letter anything else, and anything past the window."""
    if not isinstance(error, TransientError):
        return GiveUp(error.reason)
    first = state.first_failure or now
    if now - first >= window:
        return GiveUp(error.reason)
    # attempts counts earlier failed rounds; this failure is round attempts + 1.
    rung, _ttl_ms = RETRY_DELAYS[min(state.attempts, len(RETRY_DELAYS) - 1)]
    return NextRung(rung)


def failure_headers(
    headers: Mapping[str, object] | None,
    error: MessageFailure,
    *,
    state: RetryState,
    now: datetime,
    worker: str,
    detail: str,
    recipients: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """The message's headers updated with this failure, for the retry queue or the DLQ.
    ``detail`` is the error text with secrets already scrubbed. ``recipients``: the copy
    is for these recipients only from now on (otherwise it keeps what it had)."""
    updated = without_broker_headers(headers)
    if recipients is not None:
        # Addresses come from the config, which allows no commas in them.
        updated[HEADER_RECIPIENTS] = ", ".join(recipients)
    updated.update(
        {
            HEADER_ATTEMPTS: state.attempts + 1,
            HEADER_FIRST_FAILURE: (state.first_failure or now).isoformat(),
            HEADER_LAST_FAILURE: now.isoformat(),
            HEADER_REASON: error.reason,
            HEADER_LAST_ERROR: detail[:500],
            HEADER_WORKER: worker,
        }
    )
    cause = getattr(error, "cause", None)
    if cause:
        updated[HEADER_CAUSE] = cause
    else:
        updated.pop(HEADER_CAUSE, None)
    return updated
