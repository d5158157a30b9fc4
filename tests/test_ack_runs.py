"""Acks of a run of the oldest deliveries go as one ``multiple`` ack, and such an ack never
reaches a delivery still held: after a crash the broker must hand that one out again."""

from __future__ import annotations

from typing import Any

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import parse_config
from shared.topology import WORK_QUEUE
from tests.conftest import amqp_url
from tests.pipeline import queue_depth
from tests.waiting import wait_until
from worker.broker import Broker, Delivery, Unsettled, ack_all


class _Channel:
    """RabbitMQ's bookkeeping of one channel's unacked deliveries, as strict as the
    broker: an ack of a tag that is not unacked closes the channel (PRECONDITION_FAILED),
    and a ``multiple`` ack settles every unacked tag up to its own."""

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.acks: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        if tag not in self.unacked:
            raise AssertionError(f"unknown delivery tag {tag}")
        self.acks.append((tag, multiple))
        if multiple:
            self.unacked -= {t for t in self.unacked if t <= tag}
        else:
            self.unacked.discard(tag)

    def basic_reject(self, tag: int, requeue: bool) -> None:
        if tag not in self.unacked:
            raise AssertionError(f"unknown delivery tag {tag}")
        self.unacked.discard(tag)


class _Raw:
    def __init__(self, channel: _Channel, tag: int):
        self.channel = channel
        self.delivery_tag = tag
        self.delivery_info = {"routing_key": "k"}
        self.body = b"{}"
        self.properties: dict[str, Any] = {}


def _deliver(channel: _Channel, unsettled: Unsettled, count: int, first: int = 1) -> list[Delivery]:
    deliveries = []
    for tag in range(first, first + count):
        channel.unacked.add(tag)
        deliveries.append(Delivery(_Raw(channel, tag), 0.0, unsettled))
    return deliveries


def test_a_run_of_the_oldest_is_one_ack_and_an_event_held_before_it_stops_the_run() -> None:
    channel, unsettled = _Channel(), Unsettled()
    d = _deliver(channel, unsettled, 6)
    # 1 is held: 2 and 3 go one by one, as a multiple ack of 3 would settle 1 too.
    ack_all([d[1], d[2]])
    assert channel.acks == [(2, False), (3, False)]
    assert channel.unacked == {1, 4, 5, 6}
    # 1 now: it and the 2 and 3 settled before are the oldest; 4 and 6 then, and 5 held.
    channel.acks.clear()
    ack_all([d[0]])
    ack_all([d[3], d[5]])
    assert channel.acks == [(1, True), (4, True), (6, False)]
    assert channel.unacked == {5}
    assert len(unsettled) == 1
    # A requeue settles too: after it, 7 to 9 are the oldest unsettled.
    d[4].requeue()
    channel.acks.clear()
    ack_all(_deliver(channel, unsettled, 3, first=7))
    assert channel.acks == [(9, True)]
    assert channel.unacked == set()
    assert len(unsettled) == 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_whatever_is_settled_in_whatever_order_the_broker_keeps_exactly_the_held(
    data: st.DataObject,
) -> None:
    channel, unsettled = _Channel(), Unsettled()
    open_: list[Delivery] = []
    held: set[int] = set()
    next_tag = 1
    for _ in range(data.draw(st.integers(1, 30))):
        step = data.draw(
            st.sampled_from(["deliver", "ack_all", "ack", "multiple", "requeue", "hold"])
        )
        if step == "deliver" or not open_:
            count = data.draw(st.integers(1, 5))
            open_ += _deliver(channel, unsettled, count, first=next_tag)
            next_tag += count
            continue
        if step == "ack_all":
            chosen = data.draw(st.lists(st.sampled_from(open_), unique=True, min_size=1))
            ack_all(data.draw(st.permutations(chosen)))
        elif step == "multiple":  # as the silences stream's follower acks
            last = data.draw(st.sampled_from(open_))
            last.ack(multiple=True)
            chosen = [d for d in open_ if d.delivery_tag <= last.delivery_tag]
        else:
            chosen = [data.draw(st.sampled_from(open_))]
            if step == "hold":
                held.add(chosen[0].delivery_tag)
                continue
            chosen[0].ack() if step == "ack" else chosen[0].requeue()
        open_ = [d for d in open_ if d not in chosen]
        held -= {d.delivery_tag for d in chosen}
    # Nothing settled was left unacked, and nothing still open (held or not) was acked.
    assert channel.unacked == {d.delivery_tag for d in open_}
    assert len(unsettled) == len(open_)


def test_deliveries_of_two_channels_are_acked_one_by_one() -> None:
    # Each channel numbers its own deliveries: a multiple ack on one says nothing of the
    # other's, so a batch of both gets no multiple ack at all.
    a, b = _Channel(), _Channel()
    on_a, on_b = _deliver(a, Unsettled(), 3), _deliver(b, Unsettled(), 3)
    ack_all([on_a[0], on_a[1], on_b[0]])
    assert a.acks == [(1, False), (2, False)]
    assert b.acks == [(1, False)]


def test_the_tracker_stays_as_small_as_what_is_unsettled() -> None:
    """A delivery held for a long storm window while the traffic behind it is acked: what
    the tracker keeps grows with what is unsettled, not with the traffic."""
    channel, unsettled = _Channel(), Unsettled()
    _deliver(channel, unsettled, 1)  # held
    for tag in range(2, 20_002):
        ack_all(_deliver(channel, unsettled, 1, first=tag))
    kept = len(unsettled._tags) + len(unsettled._settled)
    assert kept <= 200, f"{kept} tags kept for 1 unsettled delivery"
    assert channel.unacked == {1}


@pytest.mark.integration
def test_a_crash_gives_back_the_held_delivery_and_nothing_acked_around_it(vhost: str) -> None:
    """Real RabbitMQ: ten deliveries, the fourth held, the others acked with ack_all (the
    first three as one multiple ack). The connection then drops as in a crash: the
    queue holds the fourth again, and only it."""
    broker = Broker(
        parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    )
    broker.connect()  # declares the queues
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(10):
            channel.basic_publish("", WORK_QUEUE, b"m%d" % i, mandatory=True)
    arrived: list[Delivery] = []
    broker.consume(WORK_QUEUE, arrived.append, prefetch=20)

    def drained() -> bool:
        broker.drain(0.05)
        return len(arrived) == 10

    try:
        wait_until(drained, 20, "ten deliveries")
        held = arrived[3]
        ack_all([d for d in arrived if d is not held])
        broker.drain(0.2)  # the acks are on the wire; a drain shows the channel still open
    finally:
        broker.close()  # the held one was never settled: the broker takes it back
    wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 1, 20, "the held one back alone")
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        method, _, body = connection.channel().basic_get(WORK_QUEUE, auto_ack=True)
        assert method is not None and method.redelivered
        assert body == held.body == b"m3"
