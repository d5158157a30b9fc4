"""The producer's forwarder against the real RabbitMQ: nothing leaves the spool before
the broker confirmed it, including on a fresh broker with no exchange or queue yet."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from producer.forward import Forwarder
from producer.spool import Spool
from producer.watch import SpoolWatcher
from shared.config import BrokerConfig, parse_config
from shared.event import decode_event, new_event
from shared.topology import EVENTS_EXCHANGE, WORK_QUEUE
from tests.conftest import amqp_url
from tests.waiting import wait_until
from worker.broker import connect_any, declare_topology

pytestmark = pytest.mark.integration


def broker_config(vhost: str) -> BrokerConfig:
    config = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",))
    return config.broker


class Running:
    def __init__(self, forwarder: Forwarder):
        self.forwarder = forwarder
        self.thread = threading.Thread(target=forwarder.run, daemon=True)
        self.thread.start()

    def close(self, timeout: float = 10) -> None:
        self.forwarder.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive()


@pytest.fixture
def forwarder(vhost: str, tmp_path: Path) -> Iterator[Running]:
    running = Running(Forwarder(Spool(tmp_path / "spool"), broker_config(vhost), max_backoff=0.3))
    yield running
    running.close()


def test_fresh_broker_keeps_events_in_the_spool_until_they_can_be_routed(
    forwarder: Running, vhost: str
) -> None:
    spool = forwarder.forwarder.spool
    event = new_event(module="rm", event_id=9, cluster="c", node="db.example.com", source="t")
    path = spool.write(event)

    # No exchange yet: publishing closes the channel; the file must stay.
    wait_until(lambda: forwarder.forwarder.held_back >= 1, 15, "a held-back publish")
    assert path.exists()

    params = pika.URLParameters(amqp_url(vhost))
    with pika.BlockingConnection(params) as connection:
        channel = connection.channel()
        # The exchange alone: the event is unroutable (mandatory) and must still stay.
        channel.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
        held = forwarder.forwarder.held_back
        wait_until(lambda: forwarder.forwarder.held_back > held, 15, "an unroutable publish")
        assert path.exists()

    with connect_any(broker_config(vhost))[0] as connection:
        declare_topology(connection.default_channel)
    wait_until(lambda: forwarder.forwarder.published == 1, 15, "the event to be confirmed")
    assert not path.exists()

    with pika.BlockingConnection(params) as connection:
        method, properties, body = connection.channel().basic_get(WORK_QUEUE, auto_ack=True)
    assert method is not None
    assert method.routing_key == "rm.9.db_example_com"
    assert properties.delivery_mode == 2
    assert properties.message_id == event.id
    assert decode_event(body) == event
    assert forwarder.forwarder.published == 1


def test_the_worker_tries_every_broker_url_in_turn(vhost: str) -> None:
    from shared.config import parse_config
    from tests.conftest import free_port

    dead = [f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}" for _ in range(2)]
    config = parse_config(
        {"broker": {"urls": [*dead, amqp_url(vhost)]}}, sections=("broker",)
    ).broker
    connection, index = connect_any(config)
    try:
        assert index == 2
    finally:
        connection.release()


def test_new_files_wake_the_forwarder_without_polling(vhost: str, tmp_path: Path) -> None:
    with connect_any(broker_config(vhost))[0] as connection:
        declare_topology(connection.default_channel)
    # An idle tick of a minute: only the spool watch can make this test pass in time.
    forwarder = Forwarder(Spool(tmp_path / "spool"), broker_config(vhost), tick=60)
    running = Running(forwarder)
    try:
        wait_until(lambda: forwarder.passes >= 1, 15, "the forwarder's first pass")
        paths = [
            forwarder.spool.write(
                new_event(module="rm", event_id=i, cluster="c", node="n", source="t")
            )
            for i in range(5)
        ]
        # Files leave the spool when claimed; published counts broker confirms.
        wait_until(lambda: forwarder.published == 5, 10, "all five confirmed")
        assert not any(p.exists() for p in paths)
    finally:
        running.close()


def test_spool_watch_reports_a_renamed_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    watcher = SpoolWatcher(spool.directory)
    try:
        assert watcher.uses_inotify
        assert not watcher.wait(0)
        writer = threading.Thread(
            target=spool.write,
            args=(new_event(module="rm", event_id=1, cluster="c", node="n", source="t"),),
        )
        writer.start()
        assert watcher.wait(10)
        writer.join()
    finally:
        watcher.close()


def test_an_unreadable_spool_file_is_set_aside_not_lost(forwarder: Running, vhost: str) -> None:
    with connect_any(broker_config(vhost))[0] as connection:
        declare_topology(connection.default_channel)
    spool = forwarder.forwarder.spool
    bad = spool.directory / "00000000000000000001-bad.json"
    bad.write_bytes(b"{not json")
    spool.write(new_event(module="rm", event_id=1, cluster="c", node="n", source="t"))
    wait_until(lambda: forwarder.forwarder.published == 1, 10, "the good event confirmed")
    assert not bad.exists()
    assert (spool.directory / "rejected" / bad.name).read_bytes() == b"{not json"
