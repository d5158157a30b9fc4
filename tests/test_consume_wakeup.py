"""The owner thread settles a finished mail at once, not at its next poll of the broker:
with a prefetch window of one, each next delivery waits for that ack. Real RabbitMQ and
the real Consumer; the pipeline is a stand-in that acks every message."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Mapping
from typing import cast

import pika
import pytest

from shared.config import parse_config
from shared.topology import WORK_QUEUE
from tests.conftest import amqp_url
from tests.waiting import wait_until
from worker import consume
from worker.broker import Delivery
from worker.consume import Consumer
from worker.handoff import Job
from worker.metrics import Metrics
from worker.outcome import Acked, Outcome


class _Finishes:
    """The part of a Pipeline the consumer uses without an incident stage: every message
    is acked, a moment after it arrived."""

    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.released: list[asyncio.Event] = []

    async def handle(
        self, body: bytes, headers: Mapping[str, object], *, received: float
    ) -> Outcome:
        release = asyncio.Event()
        self.released.append(release)
        self.handled.append(body)
        await release.wait()  # until the test lets it finish (see below)
        return Acked()

    def crashed(self, headers: Mapping[str, object], exc: Exception) -> Outcome:
        raise AssertionError(f"the stand-in pipeline failed: {exc}")


def _waiting_on_broker(thread: threading.Thread) -> bool:
    """Whether ``thread`` is inside the broker wait of a drain."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_wait_for_input":
            return True
        frame = frame.f_back
    return False


@pytest.mark.integration
def test_a_finished_mail_is_settled_without_waiting_for_the_next_poll(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A poll this long would hold each of the first three acks for a minute.
    monkeypatch.setattr(consume, "_DRAIN_TIMEOUT", 60.0)
    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    pipeline = _Finishes()
    consumer = Consumer(
        broker,
        pipeline,
        Metrics([]),
        loop,
        prefetch=1,
        shutdown_grace=5,  # type: ignore[arg-type]
    )
    stop = threading.Event()
    owner = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    owner.start()
    try:
        wait_until(lambda: consumer.metrics.broker_connected._value.get() == 1, 20, "connected")
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for i in range(4):
                channel.basic_publish("", WORK_QUEUE, b"m%d" % i)
        # The broker hands over each next message only once the one before is acked. Each
        # mail finishes only once the owner thread waits on the broker's socket again, as
        # a real mail does: only the wake-up can end that wait in time.
        for i in range(4):
            wait_until(lambda: len(pipeline.handled) > i, 20, f"message {i} handled")  # noqa: B023
            wait_until(lambda: _waiting_on_broker(owner), 20, "the owner thread waiting")
            loop.call_soon_threadsafe(pipeline.released[i].set)
        assert pipeline.handled == [b"m0", b"m1", b"m2", b"m3"]
    finally:
        stop.set()
        consumer.handoff._wake_writer.send(b"\0")  # ends the current minute-long wait
        owner.join(30)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(10)
        loop.close()
    assert not owner.is_alive()
    # The wake-up pair goes with the consumer, and a send finishing after that is harmless.
    assert consumer.handoff.wake.fileno() == -1
    assert consumer.handoff._wake_writer.fileno() == -1
    late = asyncio.Future[Outcome](loop=loop)
    late.set_result(Acked())
    consumer.handoff._finish(Job(cast(Delivery, None)), late)
