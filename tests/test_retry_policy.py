"""The retry policy, failure headers, secret scrubbing and DLQ filters: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import ClusteralertError, PermanentError, TlsRefusedError, TransientError
from shared.secret import Secret
from shared.topology import RETRY_DELAYS
from worker.dlq import DeadMessage, DlqFilter, parse_since
from worker.retry_policy import (
    HEADER_ATTEMPTS,
    HEADER_CAUSE,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_REASON,
    GiveUp,
    NextRung,
    RetryState,
    decide_failure,
    failure_headers,
)
from worker.scrub import Scrubber

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_transient_failures_climb_the_ladder() -> None:
    error = TransientError("connect", "refused")
    rungs = [
        decide_failure(error, RetryState(attempts, NOW - timedelta(minutes=1)), NOW, HOUR)
        for attempts in range(5)
    ]
    assert [r.rung for r in rungs if isinstance(r, NextRung)] == ["30s", "5m", "30m", "30m", "30m"]


def test_first_failure_starts_the_window() -> None:
    step = decide_failure(TransientError("timeout", "x"), RetryState(), NOW, HOUR)
    assert step == NextRung("30s")
    assert dict(RETRY_DELAYS)[step.rung] == 30_000  # the rung waits 30 s


def test_past_the_window_is_dead_lettered_with_the_last_reason() -> None:
    state = RetryState(4, NOW - HOUR)
    assert decide_failure(TransientError("rejected_4xx", "x"), state, NOW, HOUR) == GiveUp(
        "rejected_4xx"
    )


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("rejected_5xx", "550"),
        PermanentError("auth", "535"),
        TlsRefusedError("not_offered", "x"),
    ],
)
def test_permanent_and_tls_failures_are_dead_lettered_at_once(error: object) -> None:
    step = decide_failure(error, RetryState(), NOW, HOUR)  # type: ignore[arg-type]
    assert isinstance(step, GiveUp)
    assert step.reason == error.reason  # type: ignore[attr-defined]


def test_failure_headers_track_attempts_and_drop_broker_bookkeeping() -> None:
    first = failure_headers(
        {"x-death": [{"count": 1}], "x-delivery-count": 3, "other": "kept"},
        TlsRefusedError("verify", "bad cert"),
        state=RetryState(),
        now=NOW,
        worker="w1",
        detail="verify: bad cert",
    )
    assert first[HEADER_ATTEMPTS] == 1
    assert first[HEADER_REASON] == "tls_refused"
    assert first[HEADER_CAUSE] == "verify"
    assert first["other"] == "kept"
    assert "x-death" not in first and "x-delivery-count" not in first
    later = NOW + timedelta(minutes=5)
    second = failure_headers(
        first,
        TransientError("timeout", "slow"),
        state=RetryState.from_headers(first),
        now=later,
        worker="w2",
        detail="x" * 2000,
    )
    assert second[HEADER_ATTEMPTS] == 2
    assert second[HEADER_FIRST_FAILURE] == NOW.isoformat()
    assert HEADER_CAUSE not in second
    assert len(str(second[HEADER_LAST_ERROR])) == 500


def test_garbled_retry_headers_do_not_break_the_policy() -> None:
    state = RetryState.from_headers({HEADER_ATTEMPTS: "many", HEADER_FIRST_FAILURE: "soon"})
    assert state == RetryState()


def test_scrubber_masks_every_secret() -> None:
    scrub = Scrubber([Secret("hunter2"), Secret("hunter22"), None])
    assert (
        scrub("535 bad password hunter22 for hunter2") == "535 bad password ******** for ********"
    )


class _Raw:
    def __init__(self, body: bytes, headers: dict[str, object]):
        self.body = body
        self.properties = {"application_headers": headers, "message_id": "m-1"}


def test_dead_message_summary_and_filters() -> None:
    body = b'{"id":"e-1","time":"2026-11-26T03:00:00+00:00","node":"n1","module":"rm","event_id":9}'
    message = DeadMessage.from_message(
        _Raw(body, {HEADER_REASON: "tls_refused", HEADER_ATTEMPTS: 1, HEADER_LAST_ERROR: "x"})
    )
    assert message.summary() == {
        "id": "e-1",
        "time": "2026-11-26T03:00:00+00:00",
        "node": "n1",
        "event": "rm:9",
        "reason": "tls_refused",
        "attempts": 1,
        "last_error": "x",
    }
    assert DlqFilter(reason="tls_refused", node="n1", module="rm", event="rm:9").matches(message)
    assert DlqFilter(event="9", ids=frozenset({"e-1"})).matches(message)
    assert not DlqFilter(reason="auth").matches(message)
    assert DlqFilter(since=NOW - timedelta(minutes=1)).matches(message)
    assert not DlqFilter(since=NOW + timedelta(minutes=1)).matches(message)


def test_broker_dead_letters_and_undecodable_bodies_still_show() -> None:
    message = DeadMessage.from_message(_Raw(b"{nope", {"x-first-death-reason": "delivery_limit"}))
    assert (message.id, message.reason, message.key) == ("m-1", "delivery_limit", "?:?")


def test_parse_since() -> None:
    assert parse_since("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_since("2026-11-26T01:00:00Z", NOW) == NOW - timedelta(hours=2)
    with pytest.raises(ClusteralertError, match="expected a duration"):
        parse_since("yesterday", NOW)
    with pytest.raises(ClusteralertError, match="too long ago"):
        parse_since("99999999999d", NOW)


def test_since_takes_a_time_without_offset_as_utc() -> None:
    body = b'{"id":"e-1","time":"2026-11-26T03:00:00","node":"n1","module":"rm","event_id":9}'
    message = DeadMessage.from_message(_Raw(body, {HEADER_REASON: "auth"}))
    assert DlqFilter(since=NOW - timedelta(minutes=1)).matches(message)
    assert not DlqFilter(since=NOW + timedelta(minutes=1)).matches(message)
