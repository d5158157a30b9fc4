"""The producer's forwarder against the real RabbitMQ: nothing leaves the spool before
the broker confirmed it, including on a fresh broker with no exchange or queue yet."""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from producer.forward import _STOP_GRACE, Forwarder
from producer.spool import Spool
from producer.watch import SpoolWatcher
from shared.config import BrokerConfig, parse_config
from shared.errors import ConfigError
from shared.event import Event, decode_event, encode_event, new_event
from shared.own_events import canary_event, heartbeat_event
from shared.topology import EVENTS_EXCHANGE, INCOMING_QUEUE
from tests.conftest import RABBIT_HOST, RABBIT_PORT, amqp_url
from tests.pipeline import take_messages
from tests.tcpproxy import TcpProxy
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

    [(method, properties, body)] = take_messages(vhost, INCOMING_QUEUE)
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


def readable(fd: int, timeout: float) -> bool:
    """Waits on ``fd`` as the forwarder's I/O loop does."""
    return bool(select.select([fd], [], [], timeout)[0])


def test_spool_watch_reports_a_renamed_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    watcher = SpoolWatcher(spool.directory)
    try:
        assert watcher.uses_inotify
        assert not readable(watcher.fileno(), 0)
        writer = threading.Thread(
            target=spool.write,
            args=(new_event(module="rm", event_id=1, cluster="c", node="n", source="t"),),
        )
        writer.start()
        assert readable(watcher.fileno(), 10)
        writer.join()
        watcher.consume_changes()
        assert not readable(watcher.fileno(), 0)
        watcher.wake()
        assert readable(watcher.wake_fileno(), 0)
        watcher.consume_wake()
        assert not readable(watcher.wake_fileno(), 0)
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


def test_a_spooled_event_under_a_worker_only_key_is_set_aside(
    forwarder: Running, vhost: str
) -> None:
    """The broker refuses the canary's and the probe's routing keys from a producer, every
    time: such a file left in the spool would hold back every event behind it."""
    _declare(vhost)
    spool = forwarder.forwarder.spool
    forged = canary_event()
    bad = spool.directory / f"00000000000000000001-{forged.id}.json"
    spool.ensure()
    bad.write_bytes(encode_event(forged))
    good = _event(1)
    spool.write(good)
    wait_until(lambda: forwarder.forwarder.published >= 1, 10, "the good event confirmed")
    assert _drain(vhost) == [good.id]
    assert (spool.directory / "rejected" / bad.name).exists()
    assert forwarder.forwarder.set_aside == 1


def _declare(vhost: str) -> None:
    with connect_any(broker_config(vhost))[0] as connection:
        declare_topology(connection.default_channel)


def _drain(vhost: str) -> list[str]:
    return [decode_event(body).id for _, _, body in take_messages(vhost, INCOMING_QUEUE)]


def _event(i: int = 1) -> Event:
    return new_event(module="rm", event_id=i, cluster="c", node="n", source="t")


def test_a_symlink_planted_in_the_spool_is_never_followed(
    forwarder: Running, vhost: str, tmp_path: Path
) -> None:
    """Anyone in the spool's group can plant a link to a file only the agent may read;
    its content must not be published."""
    _declare(vhost)
    spool = forwarder.forwarder.spool
    secret = tmp_path / "secret.json"
    secret_event = _event(7)
    secret.write_bytes(encode_event(secret_event))
    secret.chmod(0o600)
    link = spool.directory / f"00000000000000000001-{secret_event.id}.json"
    link.symlink_to(secret)
    good = _event(1)
    spool.write(good)
    wait_until(lambda: spool.stats().events == 0, 10, "the spool handled")
    wait_until(lambda: forwarder.forwarder.published >= 1, 10, "the good event confirmed")
    assert _drain(vhost) == [good.id]
    assert (spool.directory / "rejected" / link.name).is_symlink()
    assert forwarder.forwarder.set_aside == 1


def test_a_stale_temp_symlink_is_not_taken_for_an_event(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    secret = tmp_path / "secret.json"
    secret.write_bytes(encode_event(_event(7)))
    old = time.time() - 3600
    os.utime(secret, (old, old))
    link = spool.directory / ".tmp-00000000000000000001-x.json"
    link.symlink_to(secret)
    os.utime(link, (old, old), follow_symlinks=False)
    spool.recover_stale_tmp()
    assert not list(spool.pending())
    assert (spool.directory / "rejected" / link.name).is_symlink()


def test_a_huge_spool_file_is_set_aside_without_being_read(forwarder: Running, vhost: str) -> None:
    _declare(vhost)
    spool = forwarder.forwarder.spool
    spool.ensure()
    huge = spool.directory / f"00000000000000000001-{uuid.uuid4()}.json"
    with huge.open("wb") as out:
        out.truncate(256 * 1024 * 1024)  # sparse: costs no disk
    tracemalloc.start()
    try:
        good = _event(1)
        spool.write(good)
        wait_until(lambda: forwarder.forwarder.published >= 1, 10, "the good event confirmed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\npeak memory traced while handling a 256 MiB spool file: {peak / 2**20:.1f} MiB")
    assert peak < 16 * 2**20
    assert (spool.directory / "rejected" / huge.name).exists()
    assert forwarder.forwarder.set_aside == 1


def test_a_crafted_id_never_reaches_the_log_raw(
    forwarder: Running, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An id of the right length with CR, LF and ESC in it, in a file whose name holds
    them too: nothing the forwarder logs may carry them raw."""
    _declare(vhost)
    caplog.set_level(logging.INFO)
    spool = forwarder.forwarder.spool
    spool.ensure()
    crafted = json.loads(encode_event(_event(3)))
    crafted["id"] = "12345678-1234-1234-1234-\r\nFAKE\x1b[2J.."
    assert len(crafted["id"]) == 36
    name = "00000000000000000001-\r\nforwarded event \x1b[31mx.json"
    (spool.directory / name).write_text(json.dumps(crafted))
    good = _event(1)
    spool.write(good)
    wait_until(lambda: forwarder.forwarder.published >= 1, 10, "the good event confirmed")
    wait_until(lambda: spool.stats().events == 0, 10, "the spool handled")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("producer")]
    assert any("forwarded event" in m for m in messages), messages
    for message in messages:
        assert not set(message) & {"\r", "\n", "\x1b"}, repr(message)
    assert _drain(vhost) == [good.id]


def test_confirms_that_never_come_fail_over_to_the_next_broker(vhost: str, tmp_path: Path) -> None:
    """A broker that keeps the connection up but never confirms (reached through a proxy
    that goes silent): after confirm_timeout the agent fails over to the next URL and
    every event arrives there, none lost."""
    _declare(vhost)
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
    broker = parse_config(
        {"broker": {"urls": [proxied, amqp_url(vhost)], "heartbeat": 60}}, sections=("broker",)
    ).broker
    spool = Spool(tmp_path / "spool")
    running = Running(Forwarder(spool, broker, max_backoff=0.3, confirm_timeout=2.0))
    events = [_event(i) for i in range(6)]
    try:
        spool.write(events[0])
        wait_until(lambda: running.forwarder.published == 1, 10, "the first event confirmed")
        assert proxy.accepted == 1
        proxy.mute()
        started = time.monotonic()
        for event in events[1:]:
            spool.write(event)
        wait_until(lambda: running.forwarder.published == 6, 10, "the rest confirmed")
        took = time.monotonic() - started
        print(f"\nconfirmed by the second broker {took:.1f} s after the first went silent")
        assert "confirmed nothing" in running.forwarder.last_error
        # Confirmed files are deleted on a thread of their own, just after the confirm.
        wait_until(lambda: spool.stats().events == 0, 10, "the confirmed files deleted")
    finally:
        running.close()
        proxy.close()
    # Those published into the silent link reached the broker: duplicates, not losses.
    assert set(_drain(vhost)) == {e.id for e in events}


@pytest.mark.parametrize("in_flight", [1, 0])
def test_stopping_with_a_silent_broker_keeps_the_events_and_returns(
    vhost: str, tmp_path: Path, in_flight: int
) -> None:
    """SIGTERM while the broker is silent, with or without confirms missing: a graceful
    AMQP close would wait forever for it; the agent must exit, events staying in the
    spool."""
    _declare(vhost)
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
    broker = parse_config({"broker": {"urls": [proxied]}}, sections=("broker",)).broker
    spool = Spool(tmp_path / "spool")
    running = Running(Forwarder(spool, broker, confirm_timeout=600))
    try:
        wait_until(lambda: running.forwarder.connected, 10, "connected through the proxy")
        wait_until(lambda: running.forwarder._ready, 10, "a channel in confirm mode")
        proxy.mute()
        if in_flight:
            spool.write(_event(1))
            wait_until(lambda: running.forwarder._in_flight, 10, "the event published")
        started = time.monotonic()
        running.close(timeout=_STOP_GRACE + 5)
        print(f"\nstopped {time.monotonic() - started:.1f} s after SIGTERM")
    finally:
        proxy.close()
    assert spool.stats().events == in_flight and len(list(spool.pending())) == in_flight


def test_confirm_timeout_is_read_from_the_producer_section() -> None:
    def read(value: object) -> float:
        raw = {"producer": {"confirm_timeout": value}}
        return parse_config(raw, sections=("producer",)).producer.confirm_timeout

    assert parse_config({}, sections=("producer",)).producer.confirm_timeout == 30.0
    assert read(2.5) == 2.5
    with pytest.raises(ConfigError, match=r"producer\.confirm_timeout: must be at least 0\.1"):
        read(0)


def test_a_file_that_cannot_be_moved_aside_is_passed_over(
    forwarder: Running, vhost: str, tmp_path: Path
) -> None:
    _declare(vhost)
    spool = forwarder.forwarder.spool
    spool.ensure()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool.directory / "rejected").symlink_to(elsewhere)
    bad = spool.directory / "00000000000000000001-bad.json"
    bad.write_bytes(b"{not json")
    good = _event(1)
    spool.write(good)
    wait_until(lambda: forwarder.forwarder.published == 1, 10, "the good event confirmed")
    assert _drain(vhost) == [good.id]
    assert forwarder.forwarder.set_aside == 1
    assert "left in the spool and passed over" in forwarder.forwarder.last_error
    assert [p.name for p in spool.pending()] == [bad.name]
    assert list(elsewhere.iterdir()) == []


def test_returned_publishes_leave_no_count_behind(tmp_path: Path) -> None:
    """Unit (no broker): each returned heartbeat is forgotten once its confirm settles
    it, rather than leaving a zero count per heartbeat until the next reconnect."""
    forwarder = Forwarder(Spool(tmp_path / "spool"), broker_config("unused"))
    returned = pika.BasicProperties(message_id="h1")
    for acked in (True, False):
        forwarder._on_return(None, None, returned, b"")
        forwarder._heartbeat_settled("h1", acked)
        assert not forwarder._returned
    # Two copies of one id returned: the first confirm settles one of them.
    forwarder._on_return(None, None, returned, b"")
    forwarder._on_return(None, None, returned, b"")
    forwarder._heartbeat_settled("h1", True)
    assert forwarder._returned == {"h1": 1}
    forwarder._heartbeat_settled("h1", True)
    assert not forwarder._returned
    assert forwarder.heartbeats_sent == 0


def test_heartbeats_missed_while_the_broker_was_away_are_not_sent_in_a_burst(
    vhost: str, tmp_path: Path
) -> None:
    """A heartbeat every 0.2 s; the broker is unreachable for about ten of them. None is
    spooled, and once it is back one heartbeat goes out, not the missed ten, then one per
    interval again."""
    _declare(vhost)
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
    broker = parse_config({"broker": {"urls": [proxied]}}, sections=("broker",)).broker
    spool = Spool(tmp_path / "spool")
    forwarder = Forwarder(
        spool,
        broker,
        max_backoff=0.3,
        heartbeat=lambda: heartbeat_event("c", "n1", 0.2),
        heartbeat_interval=0.2,
    )
    running = Running(forwarder)
    try:
        wait_until(lambda: forwarder.heartbeats_sent >= 3, 10, "three heartbeats confirmed")
        proxy.close()
        failures: set[float] = set()
        wait_until(
            lambda: failures.add(forwarder.last_error_time) or len(failures) >= 7,
            20,
            "six failed reconnects (about ten missed heartbeats)",
        )
        assert not forwarder.connected
        before = forwarder.heartbeats_sent
        assert not list(spool.pending())
        proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT), port=proxy.port)
        wait_until(lambda: forwarder.heartbeats_sent > before, 10, "a heartbeat after the outage")
        assert forwarder.heartbeats_sent - before <= 2, forwarder.heartbeats_sent - before
        wait_until(lambda: forwarder.heartbeats_sent >= before + 3, 10, "heartbeats going on")
    finally:
        running.close()
        proxy.close()
    assert not list(spool.pending())
