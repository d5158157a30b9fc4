"""The pipeline's outcomes for one message, with the sender replaced (unit level)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from shared.catalog import load_catalog
from shared.config import FilterConfig, MailConfig
from shared.errors import TransientError
from shared.event import encode_event, new_event
from shared.own_events import canary_event, heartbeat_event, probe_event
from worker.metrics import Metrics
from worker.outcome import Acked, DeadLetter, Outcome, Retry
from worker.pipeline import Pipeline
from worker.relay import Refusal
from worker.render import Mail, Renderer
from worker.retry_policy import (
    HEADER_ATTEMPTS,
    HEADER_FIRST_FAILURE,
    HEADER_LAST_ERROR,
    HEADER_REASON,
    HEADER_RECIPIENTS,
    HEADER_REPLAYED,
)
from worker.send import Sent


class FakeSender:
    def __init__(self, error: Exception | None = None, delay: float = 0.0):
        self.error = error
        self.delay = delay
        self.sent: list[Mail] = []

    async def send(self, mail: Mail) -> Sent:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        self.sent.append(mail)
        return Sent("relay:25")


class ExplodingRenderer(Renderer):
    def render(self, *args: object, **kwargs: object) -> Mail:
        raise KeyError("a bug")


def run(pipeline: Pipeline, body: bytes, headers: dict[str, object] | None = None) -> Outcome:
    return asyncio.run(pipeline.handle(body, headers))


def make(
    sender: FakeSender, renderer: Renderer | None = None, max_hold: float = 600.0
) -> tuple[Pipeline, Metrics]:
    metrics = Metrics([])
    mail = MailConfig(sender="c@example.com", to=("o@example.com",))
    pipeline = Pipeline(
        load_catalog([]),
        FilterConfig(),
        renderer or Renderer(mail),
        sender,
        metrics,
        retry_window=timedelta(minutes=10),  # type: ignore[arg-type]
        max_hold=max_hold,
        worker_name="w1",
        scrub=lambda t: t.replace("pw", "**"),
    )
    return pipeline, metrics


BODY = encode_event(
    new_event(
        module="node", event_id=1, cluster="c", node="n", source="t", params={"server": "db1"}
    )
)


def test_sent_is_acked() -> None:
    sender = FakeSender()
    pipeline, metrics = make(sender)
    assert run(pipeline, BODY) == Acked()
    assert len(sender.sent) == 1
    assert metrics.registry.get_sample_value("clusteralert_in_flight") == 0


def test_a_valid_event_that_crashes_rendering_is_dead_lettered() -> None:
    mail = MailConfig(sender="c@example.com", to=("o@example.com",))
    pipeline, metrics = make(FakeSender(), ExplodingRenderer(mail))
    outcome = run(pipeline, BODY)
    assert isinstance(outcome, DeadLetter) and outcome.reason == "render"
    assert outcome.headers[HEADER_REASON] == "render"
    assert (
        metrics.registry.get_sample_value("clusteralert_mails_failed_total", {"reason": "render"})
        == 1
    )


def test_transient_failure_goes_to_the_ladder_with_scrubbed_headers() -> None:
    pipeline, _ = make(FakeSender(TransientError("connect", "refused, pw=pw")))
    outcome = run(pipeline, BODY, {"x-death": [{}], "custom": "kept"})
    assert isinstance(outcome, Retry) and outcome.rung == "30s"
    assert outcome.headers[HEADER_ATTEMPTS] == 1
    assert outcome.headers["x-clusteralert-last-error"] == "refused, **=**"
    assert outcome.headers["custom"] == "kept" and "x-death" not in outcome.headers


def test_replayed_messages_are_counted_once() -> None:
    pipeline, metrics = make(FakeSender())
    run(pipeline, BODY, {HEADER_REPLAYED: 1})
    run(pipeline, BODY, {HEADER_REPLAYED: 1, HEADER_ATTEMPTS: 1})  # a later retry of it
    assert metrics.registry.get_sample_value("clusteralert_replayed_total") == 1


def test_invalid_json_is_dead_lettered_as_invalid_event() -> None:
    pipeline, metrics = make(FakeSender())
    outcome = run(pipeline, b"\xff{")
    assert isinstance(outcome, DeadLetter) and outcome.reason == "invalid_event"


def test_an_unknown_kind_that_is_filtered_is_explained_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipeline, metrics = make(FakeSender())

    def unknown(event_id: int, level: str = "info") -> bytes:
        event = new_event(
            module="zz", event_id=event_id, cluster="c", node="n", source="t", level=level
        )
        return encode_event(event)

    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        for body in (unknown(1), unknown(1), unknown(2), unknown(1)):
            assert run(pipeline, body) == Acked()
    explained = [r.getMessage() for r in caplog.records if "counted but not mailed" in r.message]
    assert len(explained) == 2
    assert explained[0].startswith("zz:1 is not in the catalog; level info is below")
    assert "add zz:1 to a catalog ([catalog] path)" in explained[0]
    assert "zz:2" in explained[1]


class DeferringSender(FakeSender):
    """Accepts the mail, and refuses the addresses in ``later`` for now (450)."""

    def __init__(self, later: tuple[str, ...]):
        super().__init__()
        self.later = later

    async def send(self, mail: Mail) -> Sent:
        self.sent.append(mail)
        deferred = {r: Refusal(450, "450 4.2.0 greylisted") for r in mail.recipients}
        return Sent("relay:25", {r: v for r, v in deferred.items() if r in self.later})


def make_routed(sender: FakeSender) -> Pipeline:
    mail = MailConfig(sender="c@example.com", to=("a@example.com", "b@example.com"))
    pipeline, _ = make(sender, Renderer(mail))
    return pipeline


def test_recipients_refused_for_now_get_a_retry_copy_of_their_own() -> None:
    sender = DeferringSender(later=("b@example.com",))
    outcome = run(make_routed(sender), BODY, {"custom": "kept"})
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.rung) == ("rejected_4xx", "30s")
    assert outcome.headers[HEADER_RECIPIENTS] == "b@example.com"
    assert outcome.headers[HEADER_ATTEMPTS] == 1 and outcome.headers["custom"] == "kept"
    assert "greylisted" in str(outcome.headers[HEADER_LAST_ERROR])
    assert [m.recipients for m in sender.sent] == [("a@example.com", "b@example.com")]


def test_a_retry_copy_goes_to_its_recipients_only() -> None:
    sender = FakeSender()
    outcome = run(make_routed(sender), BODY, {HEADER_RECIPIENTS: b"b@example.com"})
    assert outcome == Acked()
    [mail] = sender.sent
    assert mail.recipients == ("b@example.com",)
    assert b"To: a@example.com,\r\n b@example.com\r\n" in mail.data  # the same mail as before


def test_the_recipients_header_cannot_add_a_recipient() -> None:
    sender = FakeSender()
    headers = {HEADER_RECIPIENTS: "evil@attacker.example, b@example.com"}
    assert run(make_routed(sender), BODY, headers) == Acked()
    assert [m.recipients for m in sender.sent] == [("b@example.com",)]
    # None of them configured any more: nothing is sent, and the copy is done.
    sender.sent.clear()
    headers = {HEADER_RECIPIENTS: "evil@attacker.example"}
    assert run(make_routed(sender), BODY, headers) == Acked()
    assert sender.sent == []


def test_a_garbled_recipients_header_means_every_recipient() -> None:
    sender = FakeSender()
    for garbled in (7, "", " , "):
        run(make_routed(sender), BODY, {HEADER_RECIPIENTS: garbled})
    assert {m.recipients for m in sender.sent} == {("a@example.com", "b@example.com")}


def test_recipients_still_refused_when_the_window_is_over_are_dead_lettered() -> None:
    sender = DeferringSender(later=("b@example.com",))
    headers = {
        HEADER_RECIPIENTS: "b@example.com",
        HEADER_ATTEMPTS: 3,
        HEADER_FIRST_FAILURE: "2000-01-01T00:00:00+00:00",
    }
    outcome = run(make_routed(sender), BODY, headers)
    assert isinstance(outcome, DeadLetter) and outcome.reason == "rejected_4xx"
    assert outcome.headers[HEADER_RECIPIENTS] == "b@example.com"
    assert outcome.headers[HEADER_ATTEMPTS] == 4
    assert [m.recipients for m in sender.sent] == [("b@example.com",)]


def test_a_compressed_body_is_refused_unread() -> None:
    pipeline, _ = make(FakeSender())
    outcome = run(pipeline, b"x\x9c...", {"compression": "application/x-gzip"})
    assert isinstance(outcome, DeadLetter) and outcome.reason == "invalid_event"
    assert "compressed bodies are not accepted" in str(outcome.headers[HEADER_LAST_ERROR])


def test_a_mail_not_sent_within_max_hold_goes_to_the_ladder() -> None:
    sender = FakeSender(delay=30)
    pipeline, metrics = make(sender, max_hold=0.05)
    outcome = run(pipeline, BODY)
    assert isinstance(outcome, Retry)
    assert (outcome.reason, outcome.rung) == ("timeout", "30s")
    assert "not delivered within 0.05s" in str(outcome.headers[HEADER_LAST_ERROR])
    assert sender.sent == []
    get = metrics.registry.get_sample_value
    assert get("clusteralert_mails_failed_total", {"reason": "timeout"}) == 1


def test_the_pipelines_own_events_on_the_mail_queue() -> None:
    """A canary goes to [canary] to alone and marks its success; with no [canary] to on
    this worker it is acked unmailed; a heartbeat or probe (a replayed dead letter) is
    acked unmailed. None of them counts as an event."""
    sender = FakeSender()
    pipeline, metrics = make(sender)
    pipeline.canary_to = ("canary@example.com",)
    success = "clusteralert_canary_last_success_timestamp_seconds"
    assert run(pipeline, encode_event(canary_event())).action == "ack"
    [mail] = sender.sent
    assert mail.recipients == ("canary@example.com",)
    assert b"To: canary@example.com\r\n" in mail.data
    assert (metrics.registry.get_sample_value(success) or 0) > 0
    for own in (heartbeat_event("c", "n", 60), probe_event()):
        assert run(pipeline, encode_event(own)).action == "ack"
    pipeline.canary_to = ()
    assert run(pipeline, encode_event(canary_event())).action == "ack"
    assert len(sender.sent) == 1
    assert metrics.registry.get_sample_value("clusteralert_events_consumed_total") == 0


def test_the_canary_success_time_is_the_canarys_own_and_never_moves_back() -> None:
    """A canary that waited (in the retry ladder, or replayed from the DLQ) proves the
    path worked when it was sent, not now: an old one must not make a broken path look
    fine, and, mailed after a newer one, must not move the time back."""
    pipeline, metrics = make(FakeSender())
    pipeline.canary_to = ("canary@example.com",)
    success = "clusteralert_canary_last_success_timestamp_seconds"
    old = replace(canary_event(), time=datetime.now(UTC) - timedelta(hours=2))
    assert run(pipeline, encode_event(old)).action == "ack"
    assert metrics.registry.get_sample_value(success) == old.time.timestamp()
    fresh = canary_event()
    assert run(pipeline, encode_event(fresh)).action == "ack"
    assert metrics.registry.get_sample_value(success) == fresh.time.timestamp()
    assert run(pipeline, encode_event(old)).action == "ack"  # replayed from the DLQ
    assert metrics.registry.get_sample_value(success) == fresh.time.timestamp()
    # A canary stamped ahead of this worker's clock counts as mailed now.
    before = time.time()
    ahead = replace(canary_event(), time=datetime.now(UTC) + timedelta(days=1))
    assert run(pipeline, encode_event(ahead)).action == "ack"
    assert before <= (metrics.registry.get_sample_value(success) or 0) <= time.time()


def test_a_refused_canary_fails_like_any_mail_and_marks_no_success() -> None:
    pipeline, metrics = make(FakeSender(error=TransientError("connect", "refused")))
    pipeline.canary_to = ("canary@example.com",)
    outcome = run(pipeline, encode_event(canary_event()))
    assert (outcome.action, outcome.reason) == ("retry", "connect")
    success = "clusteralert_canary_last_success_timestamp_seconds"
    assert metrics.registry.get_sample_value(success) == 0
