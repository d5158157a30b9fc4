"""The silence step of the incident stage and the stream follower, without a broker:
fakes of the broker, the follower and the deliveries. What they write, ack and return to
the queue when the stream misbehaves or a silence cannot be summarised."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

from shared.catalog import load_catalog
from shared.config import FilterConfig
from shared.event import new_event
from shared.filter import decide
from shared.silence import HeldRow, Record, Silence, SilenceBook, decode_record, held_record
from tests.waiting import wait_until
from worker.broker import Broker, Delivery, PublishNotConfirmed
from worker.metrics import Metrics
from worker.silence_cli import stalled
from worker.silence_follow import SilenceFollower
from worker.silence_stage import SILENCE_BATCH, SilenceStep

CATALOG = load_catalog([])


@dataclass
class FakeBroker:
    fail: bool = False
    published: list[tuple[str, bytes]] = field(default_factory=list)

    def publish_confirmed(
        self, body: bytes, properties: dict[str, Any], exchange: str, key: str, **_: str
    ) -> None:
        if self.fail:
            raise PublishNotConfirmed("nack")
        self.published.append((key, body))


@dataclass
class FakeFollower:
    book: SilenceBook = field(default_factory=SilenceBook)

    def sync(self) -> str:
        return "nonce"

    def synced(self, nonce: str) -> bool:
        return True


@dataclass(eq=False)
class FakeDelivery:
    acked: int = 0
    requeued: int = 0

    def ack(self) -> None:
        self.acked += 1

    def requeue(self) -> None:
        self.requeued += 1


def _step(broker: FakeBroker, follower: FakeFollower, pauses: list[int]) -> SilenceStep:
    return SilenceStep(
        cast(Broker, broker),
        cast(SilenceFollower, follower),
        Metrics([]),
        pause=lambda: pauses.append(1),
    )


def _silence(start: datetime, end: datetime, sid: str = "s1") -> Silence:
    return Silence(sid, ("monitor:*",), start, end, "al", "patch")


def _summarise(step: SilenceStep) -> None:
    step.service(active=True)  # writes the sync record
    step.service(active=True)  # reads it back: the summaries


def test_a_failing_stream_write_is_not_retried_at_once_by_a_full_batch() -> None:
    """Each write that fails returns the batch to the queue, and each return charges
    every event a delivery: the step and the stage wait before they try again."""
    now = datetime.now(UTC)
    follower = FakeFollower()
    follower.book.apply(Record("add", "s1", silence=_silence(now, now + timedelta(hours=1))))
    broker, pauses = FakeBroker(fail=True), []  # type: ignore[var-annotated]
    step = _step(broker, follower, pauses)
    event = new_event(module="monitor", event_id=1, cluster="c", node="n", source="t")
    decision = decide(event, CATALOG, FilterConfig())
    deliveries = [FakeDelivery() for _ in range(SILENCE_BATCH)]
    for _ in range(3):  # the same events, back at once each time
        for delivery in deliveries:
            assert step.take(event, decision, cast(Delivery, delivery))
    assert {d.requeued for d in deliveries} == {1}
    assert pauses == [1] and step.waiting == 2 * SILENCE_BATCH
    assert not any(d.acked for d in deliveries)


def test_a_summary_that_cannot_be_made_is_skipped_once_and_others_are_still_sent() -> None:
    """A record the parser let through but that breaks the summary (as a time before
    year 1 in UTC once did) must not stop the stage of every worker in turn."""
    odd = timezone(timedelta(hours=5))
    book = SilenceBook()
    bad = Silence(
        "bad",
        ("monitor:*",),
        datetime.min.replace(tzinfo=odd),
        datetime.min.replace(tzinfo=odd),
        "al",
        "x",
    )
    now = datetime.now(UTC)
    good = _silence(now - timedelta(hours=2), now - timedelta(hours=1), "good")
    row = HeldRow("c", "monitor:1", "n", 3, now - timedelta(hours=2), now - timedelta(hours=2))
    for silence in (bad, good):
        book.apply(Record("add", silence.id, silence=silence))
        book.apply(held_record(silence.id, [row]))
    broker = FakeBroker()
    step = _step(broker, FakeFollower(book), [])
    for _ in range(3):
        _summarise(step)
    mailed = [body for key, body in broker.published if key == "clusteralert.mail"]
    assert len(mailed) == 1 and b"good" in mailed[0]
    records = [decode_record(b) for key, b in broker.published if key != "clusteralert.mail"]
    assert [(r.type, r.id) for r in records if r.type == "summarised"] == [("summarised", "good")]


def test_a_silence_that_held_back_nothing_mails_no_summary() -> None:
    now = datetime.now(UTC)
    follower = FakeFollower()
    follower.book.apply(Record("add", "s1", silence=_silence(now - timedelta(hours=1), now)))
    broker = FakeBroker()
    _summarise(_step(broker, follower, []))
    assert [key for key, _ in broker.published if key == "clusteralert.mail"] == []
    records = [decode_record(body) for _, body in broker.published]
    assert [r.type for r in records] == ["summarised"]


@dataclass(eq=False)
class StreamRecord:
    body: bytes
    acks: int = 0

    def ack(self, *, multiple: bool = False) -> None:
        self.acks += 1


@dataclass
class FakeStream:
    """A broker whose silences stream refuses writes while ``fail`` is set."""

    fail: bool = True
    attempts: int = 0
    reader: Callable[[Any], None] | None = None

    def consume(
        self, queue: str, callback: Callable[[Any], None], **_: object
    ) -> Callable[[], None]:
        self.reader = callback
        return lambda: None

    def publish_confirmed(
        self, body: bytes, properties: dict[str, Any], exchange: str, key: str, **_: str
    ) -> None:
        self.attempts += 1
        if self.fail:
            raise PublishNotConfirmed("not confirmed")
        assert self.reader is not None
        self.reader(StreamRecord(body))


def test_a_stream_that_refuses_writes_leaves_the_connection_up_and_is_retried() -> None:
    """Before, the follower raised BrokerUnavailable: the worker reconnected and
    abandoned the delivery stage's mails in flight, over and over."""
    stream = FakeStream()
    follower = SilenceFollower(cast(Broker, stream))
    follower.start()  # does not raise
    assert not follower.caught_up and follower.sync_failure is not None
    follower.service()
    assert stream.attempts == 1  # not again at once: after a backoff
    stream.fail = False

    def caught_up() -> bool:
        follower.service()
        return follower.caught_up

    wait_until(caught_up, 5, "the follower caught up")
    assert stream.attempts == 2 and follower.sync_failure is None


def test_reading_the_stream_times_out_only_when_records_stop_coming() -> None:
    """A fixed 30 s limit broke 'silence list' near 650,000 records (a week of one
    silence holding back a record a second)."""
    clock, read = [0.0], [0]
    deadline = stalled(lambda: read[0], idle=30, clock=lambda: clock[0])
    for _ in range(100):  # 1,000 s of reading, records still coming
        clock[0] += 10
        read[0] += 200_000
        assert not deadline()
    clock[0] += 30
    assert not deadline()
    clock[0] += 1
    assert deadline()
