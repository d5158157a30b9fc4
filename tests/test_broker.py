"""worker.broker against the real RabbitMQ: what py-amqp and kombu raise leaves it as our
own errors, and two consumers and a confirmed publish share one connection on one thread.
Plus the pieces of the failure vocabulary that need no broker (unit level)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta

import aiosmtplib
import pika
import pytest

import worker.broker as broker_module
from shared.backoff import Backoff
from shared.config import BrokerConfig, parse_config
from shared.errors import (
    ConnectionDropped,
    DeliveryError,
    TransientError,
    UnusableEvent,
    WorkerCrash,
)
from shared.topology import DEAD_QUEUE, DLX_EXCHANGE, WORK_QUEUE
from tests.conftest import Certs, amqp_url, free_port
from tests.pipeline import queue_depth
from tests.test_consume_faults import refuse_dead_letters
from tests.waiting import wait_until
from worker.broker import (
    METHODS_PER_DRAIN,
    Broker,
    BrokerUnavailable,
    ConfirmedPublisher,
    Delivery,
    Outgoing,
    PublishNotConfirmed,
    TopologyMismatch,
    _writes_joined,
    connect_any,
    copy_properties,
    declare_topology,
    talking,
)
from worker.broker import _wait_for_input as wait_for_input
from worker.classify import classify_connect, classify_transaction
from worker.retry_policy import GiveUp, RetryState, decide_failure


def broker_config(*urls: str) -> BrokerConfig:
    return parse_config({"broker": {"urls": list(urls)}}, sections=("broker",)).broker


@pytest.mark.integration
def test_no_broker_answering_is_broker_unavailable_naming_each_url(vhost: str) -> None:
    dead = [f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}" for _ in range(2)]
    broker = Broker(broker_config(*dead))
    heard: list[str] = []
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker") as caught:
        broker.connect(on_failure=lambda url, why: heard.append(str(url)))
    assert all(str(url) in str(caught.value) for url in broker.config.urls)
    assert heard == [str(url) for url in broker.config.urls]
    assert "guest:guest" not in str(caught.value)  # URLs are shown without the password


@pytest.mark.integration
def test_a_queue_with_other_arguments_is_topology_mismatch(vhost: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        connection.channel().queue_declare(WORK_QUEUE, durable=True)  # classic, no limits
    broker = Broker(broker_config(amqp_url(vhost)))
    with pytest.raises(TopologyMismatch):
        broker.connect()
    broker.close()


@pytest.mark.integration
def test_two_consumers_and_confirmed_publishes_share_one_connection(vhost: str) -> None:
    broker = Broker(broker_config(amqp_url(vhost)))
    broker.connect()
    try:
        got: dict[str, list[Delivery]] = {WORK_QUEUE: [], DEAD_QUEUE: []}
        for queue, deliveries in got.items():
            broker.consume(queue, deliveries.append, prefetch=4)
        properties = copy_properties({"message_id": "m1"}, {"x": "y"})
        broker.publish_confirmed(b"to work", properties, "", WORK_QUEUE)
        broker.publish_confirmed(b"to dead", properties, DLX_EXCHANGE, "")

        def both_arrived() -> bool:
            broker.drain(0.05)
            return all(got.values())

        wait_until(both_arrived, 10, "a delivery on each consumer")
        [work], [dead] = got[WORK_QUEUE], got[DEAD_QUEUE]
        assert (work.body, dead.body) == (b"to work", b"to dead")
        assert work.headers == {"x": "y"} and work.properties["message_id"] == "m1"
        work.ack()
        dead.ack()
        # No queue for it: the broker returns it, and the publish is not confirmed.
        with pytest.raises(PublishNotConfirmed):
            broker.publish_confirmed(b"lost", properties, "", "no.such.queue")
        # The connection is still good for the next publish.
        broker.publish_confirmed(b"again", properties, "", WORK_QUEUE)
    finally:
        broker.close()
    # A settle on a connection that is gone is BrokerUnavailable, not an amqp error.
    with pytest.raises(BrokerUnavailable):
        work.ack()


@pytest.mark.integration
def test_a_drain_ends_at_a_wake_up_and_takes_every_frame_already_there(vhost: str) -> None:
    """The owner thread waits on the broker's socket; another thread's finished mail
    must end that wait at once (its ack frees the next delivery of a full prefetch
    window), and a burst of deliveries must not cost one pass of the loop per frame."""
    broker = Broker(broker_config(amqp_url(vhost)))
    broker.connect()
    wake, writer = socket.socketpair()
    wake.setblocking(False)
    try:
        got: list[Delivery] = []
        broker.consume(WORK_QUEUE, got.append, prefetch=100)
        broker.drain(0.2)  # the consume-ok and anything else already sent
        # Nothing arrives from the broker: only the wake-up (written before the wait, as
        # a mail finishing just then does) can end a drain that would wait 60 s.
        writer.send(b"\0")
        started = time.monotonic()
        broker.drain(60.0, wake=wake)
        assert time.monotonic() - started < 30, "the wake-up did not end the wait"
        with pytest.raises(BlockingIOError):
            wake.recv(1)  # consumed by the drain, so the next one waits again
        # A burst of 20 deliveries (60 frames), all sent to the consumer before it reads:
        # a drain takes what is there, not one delivery per pass of the owner loop.
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as publisher:
            channel = publisher.channel()
            channel.confirm_delivery()
            for i in range(20):
                channel.basic_publish("", WORK_QUEUE, b"m%d" % i)
        wait_until(lambda: queue_depth(vhost, WORK_QUEUE) == 0, 10, "all 20 sent to the consumer")
        assert METHODS_PER_DRAIN >= 20
        drains = 0
        while len(got) < 20 and drains < 40:
            broker.drain(5.0, wake=wake)
            drains += 1
        assert [d.body for d in got] == [b"m%d" % i for i in range(20)]
        # One when every frame is in the socket already; a few if the last trickle in.
        assert drains <= 5, f"{drains} drains for a burst of 20"
    finally:
        broker.close()
        wake.close()
        writer.close()


def test_tls_bytes_already_decrypted_count_as_input(certs: Certs) -> None:
    """Over TLS, the record py-amqp read from may hold more frames than the one it took:
    they sit decrypted in the TLS layer, where select cannot see them. A drain that
    waited on the socket regardless would leave them there until the next heartbeat."""
    listener = socket.create_server(("127.0.0.1", 0))
    server_context = certs.server_context()
    client_context = ssl.create_default_context(cafile=str(certs.ca_file))

    def serve() -> None:
        raw, _ = listener.accept()
        with server_context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"first frame" + b"second frame")  # one TLS record
            tls.recv(1)  # until the client is done

    server = threading.Thread(target=serve)
    server.start()
    try:
        with client_context.wrap_socket(
            socket.create_connection(listener.getsockname()), server_hostname="127.0.0.1"
        ) as client:
            assert client.recv(11) == b"first frame"
            assert client.pending() > 0  # the rest was decrypted with the first part
            # Nothing more will come on the socket, yet there is input.
            assert wait_for_input(client, None, 0.0)
            assert client.recv(12) == b"second frame"
            assert not wait_for_input(client, None, 0.0)
            client.sendall(b"x")
    finally:
        server.join(10)
        listener.close()


@pytest.mark.integration
def test_many_publishes_in_flight_run_their_confirm_callbacks_and_a_return_stops_them(
    vhost: str,
) -> None:
    connection, _ = connect_any(broker_config(amqp_url(vhost)), retries=0)
    try:
        with talking():
            declare_topology(connection.default_channel)
        publisher = ConfirmedPublisher(connection, timeout=10)
        confirmed: list[int] = []
        properties = copy_properties({}, {})
        for n in range(3):
            publisher.publish(b"x", properties, "", WORK_QUEUE, lambda n=n: confirmed.append(n))
        assert publisher.pending <= 3
        publisher.flush()
        assert confirmed == [0, 1, 2] and publisher.pending == 0
        # No queue for it: returned, so neither it nor anything after it counts.
        publisher.publish(b"x", properties, "", "no.such.queue", lambda: confirmed.append(9))
        publisher.publish(b"x", properties, "", WORK_QUEUE, lambda: confirmed.append(10))
        with pytest.raises(PublishNotConfirmed, match=r"no\.such\.queue"):
            publisher.flush()
        assert confirmed == [0, 1, 2]
    finally:
        connection.collect()


@pytest.mark.integration
def test_a_batch_of_publishes_is_confirmed_each_on_its_own(vhost: str) -> None:
    broker = Broker(broker_config(amqp_url(vhost)))
    broker.connect()
    try:
        refuse_dead_letters(vhost)  # the DLQ's broker nacks every publish from now on

        def outgoing(body: bytes, exchange: str, routing_key: str) -> Outgoing:
            properties = copy_properties({"message_id": body.decode()}, {})
            return Outgoing(body, properties, exchange, routing_key)

        batch = [
            outgoing(b"a", "", WORK_QUEUE),
            outgoing(b"b", "", "no.such.queue"),  # returned
            outgoing(b"c", DLX_EXCHANGE, ""),  # nacked
            outgoing(b"d", "", WORK_QUEUE),
        ]
        results = broker.publish_each_confirmed(batch)
        assert results[0] is None and results[3] is None
        assert results[1] is not None and "returned" in results[1]
        assert results[2] is not None and "nack" in results[2]
        # No such exchange: the broker closes the channel; the next batch gets a new one,
        # whose publishes the broker numbers from 1 again.
        [closed] = broker.publish_each_confirmed([outgoing(b"x", "no.such.exchange", "")])
        assert closed is not None and "not confirmed" in closed
        assert broker.publish_each_confirmed([outgoing(b"e", "", WORK_QUEUE)]) == [None]
        got: list[Delivery] = []
        broker.consume(WORK_QUEUE, got.append, prefetch=10)

        def three() -> bool:
            broker.drain(0.05)
            return len(got) >= 3

        wait_until(three, 10, "the three confirmed publishes")
        assert sorted(d.body for d in got) == [b"a", b"d", b"e"]
    finally:
        broker.close()


@pytest.mark.integration
def test_a_late_confirm_of_a_channel_given_up_on_confirms_nothing_of_the_next_batch(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that gets no confirm in time leaves its channel open (closing it would
    wait on the broker), and that channel's confirms may still come, numbered from 1 as
    the next channel's publishes are. Taken for the next batch's, a notification the
    broker returned would count as confirmed, and the events it covers would be acked."""
    broker = Broker(broker_config(amqp_url(vhost)))
    broker.connect()
    try:

        def outgoing(body: bytes, routing_key: str) -> Outgoing:
            properties = copy_properties({"message_id": body.decode()}, {})
            return Outgoing(body, properties, "", routing_key)

        monkeypatch.setattr(broker_module, "CONFIRM_TIMEOUT", 0.0)  # given up at once
        [late] = broker.publish_each_confirmed([outgoing(b"a", WORK_QUEUE)])
        assert late is not None and "not confirmed" in late
        given_up = broker._connection.connection.channels  # type: ignore[union-attr]
        old = [c for c in given_up.values() if c.channel_id and c.is_open]
        monkeypatch.setattr(broker_module, "CONFIRM_TIMEOUT", 30.0)
        # The old channel's ack of its publish 1 comes while the next batch waits.
        connection = broker._connection.connection  # type: ignore[union-attr]
        drain = connection.drain_events

        def late_ack_first(timeout: float | None = None) -> None:
            for channel in old:
                for handler in list(channel.events["basic_ack"]):
                    handler(1, True)
            drain(timeout=timeout)

        monkeypatch.setattr(connection, "drain_events", late_ack_first)
        [returned] = broker.publish_each_confirmed([outgoing(b"b", "no.such.queue")])
        assert returned is not None and "returned" in returned
    finally:
        broker.close()


def test_failures_that_are_not_delivery_failures_have_their_own_classes() -> None:
    now_state = RetryState()
    for failure in (UnusableEvent("invalid_event", "x"), WorkerCrash("KeyError: 'a'")):
        assert not isinstance(failure, DeliveryError)
        step = decide_failure(failure, now_state, datetime.now(UTC), timedelta(hours=1))
        assert step == GiveUp(failure.reason)
    assert WorkerCrash("x").reason == "crash"


def test_a_dropped_connection_is_its_own_type_only_mid_transaction() -> None:
    dropped = classify_transaction(aiosmtplib.SMTPServerDisconnected("gone"))
    assert isinstance(dropped, ConnectionDropped) and dropped.reason == "disconnected"
    reset = classify_transaction(ConnectionResetError("reset by peer"))
    assert isinstance(reset, ConnectionDropped) and reset.reason == "connect"
    # A fresh connection that fails is a transient failure, not a dropped one.
    refused = classify_connect(ConnectionRefusedError("refused"))
    assert isinstance(refused, TransientError) and not isinstance(refused, ConnectionDropped)
    timeout = classify_transaction(aiosmtplib.SMTPTimeoutError("slow"))
    assert not isinstance(timeout, ConnectionDropped)


def test_backoff_doubles_with_jitter_up_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    delays = [backoff.delay() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    backoff.reset()
    assert 0.25 <= backoff.delay() <= 0.5


@pytest.mark.integration
def test_a_batch_of_publishes_goes_out_in_one_write_and_arrives_whole_and_in_order(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = Broker(broker_config(amqp_url(vhost)))
    broker.connect()
    try:
        assert broker._connection is not None
        transport = broker._connection.connection.transport
        writes: list[int] = []
        real_write = transport._write  # plain TCP: the socket's sendall

        def counted(data: bytes) -> None:
            writes.append(len(data))
            real_write(data)

        monkeypatch.setattr(transport, "_write", counted)
        # Bodies of several sizes: py-amqp packs each publish in a buffer it reuses, so a
        # kept view instead of a copy would send the last one's bytes for all.
        bodies = [bytes([65 + n % 26]) * (50 + 700 * n) for n in range(12)]
        batch = [
            Outgoing(body, copy_properties({"message_id": str(n)}, {}), "", WORK_QUEUE)
            for n, body in enumerate(bodies)
        ]
        # The first batch opens its channel (two writes of their own).
        assert broker.publish_each_confirmed(batch[:1]) == [None]
        writes.clear()
        assert broker.publish_each_confirmed(batch[1:]) == [None] * (len(batch) - 1)
        assert len(writes) == 1  # eleven publishes, in one write
        monkeypatch.undo()
        got: list[Delivery] = []
        broker.consume(WORK_QUEUE, got.append, prefetch=20)

        def all_of_them() -> bool:
            broker.drain(0.05)
            return len(got) >= len(bodies)

        wait_until(all_of_them, 10, "the batch delivered")
        assert [d.body for d in got] == bodies
    finally:
        broker.close()


def test_joined_writes_leave_a_transport_with_a_write_method_as_it_was() -> None:
    # py-amqp's TLS transport writes with a method of its class, not a socket's sendall.
    class Transport:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def _write(self, data: bytes) -> None:
            self.sent.append(data)

        def write(self, data: bytes) -> None:
            self._write(data)

    transport = Transport()
    buffer = bytearray(b"aa")
    with _writes_joined(transport):
        transport.write(memoryview(buffer))
        buffer[:] = b"bb"  # py-amqp reuses its buffer for the next publish
        transport.write(memoryview(buffer))
        assert transport.sent == []
    assert transport.sent == [b"aabb"]
    assert "_write" not in vars(transport)
    transport.write(b"c")
    assert transport.sent == [b"aabb", b"c"]
