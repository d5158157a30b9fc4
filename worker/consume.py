"""Consume and settle: the bridge between kombu and the asyncio sender.

kombu channels are not thread-safe, and AMQP heartbeats are only sent while the thread
that owns the connection keeps servicing it. So one thread (the caller's) owns the
connection: it drains deliveries, hands each body to the pipeline on the asyncio loop
thread, and settles the results from a queue. Nothing on this thread waits for SMTP, so
a slow relay never stalls heartbeats, and acks are sent on the channel's own thread.

A fault of one message stays that message's: a settle that fails returns only that
message to the queue, and the connection is dropped only when the broker side is really
broken. Every reconnect hands all prefetched messages back to the broker, which charges
each a delivery against the work queue's delivery limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from typing import Any

import amqp.exceptions
import kombu.exceptions
from kombu import Connection

from shared.config import BrokerConfig, BrokerUrl
from shared.errors import ClusteralertError, describe
from shared.topology import WORK_QUEUE
from worker.declare import declare_topology
from worker.metrics import Metrics
from worker.pipeline import Outcome, Pipeline
from worker.settle import SettleError, Settler

__all__ = ["Consumer", "Delivery", "kombu_connection"]

log = logging.getLogger(__name__)

# How long one drain waits for a delivery before settling finished work and checking
# heartbeats. It bounds the delay of an ack, not of a mail.
_DRAIN_TIMEOUT = 0.02
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0


class Delivery:
    """One message from the work queue as py-amqp handed it over, untouched: kombu's own
    Message would inflate a body with a ``compression`` header before anyone could check
    its size."""

    __slots__ = ("_channel", "body", "delivery_tag", "headers", "properties", "received")

    def __init__(self, raw: amqp.Message, received: float):
        self._channel = raw.channel
        self.delivery_tag: int = raw.delivery_tag
        self.body: bytes = raw.body
        self.properties: dict[str, Any] = dict(raw.properties)
        self.headers: dict[str, Any] = dict(self.properties.get("application_headers") or {})
        self.received = received

    def ack(self) -> None:
        self._channel.basic_ack(self.delivery_tag)

    def requeue(self) -> None:
        """Give this one message back; the broker charges it, and only it, a delivery."""
        self._channel.basic_reject(self.delivery_tag, requeue=True)


class TopologyMismatch(ClusteralertError):
    """The broker has our names with other arguments; retrying will not fix it."""


def kombu_connection(config: BrokerConfig, url: BrokerUrl) -> Connection:
    """A kombu connection to one broker. Failover is ours (see :func:`connect_any`):
    kombu's own shares one TLS option dict between hosts and verifies every host against
    the first one's name."""
    ssl_options: dict[str, Any] | bool = False
    if url.scheme == "amqps":
        ssl_options = {
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": str(config.ca_file) if config.ca_file else None,
            "certfile": str(config.cert_file) if config.cert_file else None,
            "keyfile": str(config.key_file) if config.key_file else None,
            "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
            "server_hostname": url.host,
        }
    return Connection(
        url.with_secret(),
        heartbeat=config.heartbeat,
        connect_timeout=config.connect_timeout,
        ssl=ssl_options,
        transport_options={
            "client_properties": {"connection_name": f"clusteralert-worker@{socket.gethostname()}"}
        },
    )


def connect_any(config: BrokerConfig, start: int = 0) -> tuple[Connection, int]:
    """Connect to the first broker that answers, trying every URL once from ``start``.
    Returns the connection and the index of its URL; raises the last error."""
    last: BaseException | None = None
    count = len(config.urls)
    for offset in range(count):
        index = (start + offset) % count
        connection = kombu_connection(config, config.urls[index])
        try:
            connection.connect()
        except (*connection.connection_errors, OSError) as exc:
            last = exc
            log.warning("broker %s unreachable: %s", config.urls[index], describe(exc))
            _close_quietly(connection)
            continue
        return connection, index
    assert last is not None
    raise last


class Consumer:
    def __init__(
        self,
        broker: BrokerConfig,
        pipeline: Pipeline,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        prefetch: int,
        shutdown_grace: float,
    ):
        self.broker = broker
        self.pipeline = pipeline
        self.metrics = metrics
        self.loop = loop
        self.prefetch = prefetch
        self.shutdown_grace = shutdown_grace
        self._done: queue.SimpleQueue[Future[Outcome]] = queue.SimpleQueue()
        self._in_flight: dict[Future[Outcome], Delivery] = {}
        self._settler: Settler | None = None

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting with backoff when the broker goes
        away. On stop: cancel the consumer, let in-flight mails finish within the grace
        period, settle them, and close; anything unsettled returns to the queue."""
        backoff = _MIN_BACKOFF
        index = 0
        while not stop.is_set():
            connection: Connection | None = None
            try:
                connection, index = connect_any(self.broker, index)
                log.info("connected to broker %s", self.broker.urls[index])
                backoff = _MIN_BACKOFF
                self._consume(connection, stop)
            except _RECONNECT_ON as exc:
                self.metrics.broker_connected.set(0)
                delay = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
                log.warning(
                    "broker connection failed: %s; reconnecting in %.1fs", describe(exc), delay
                )
                backoff = min(backoff * 2, _MAX_BACKOFF)
                # Deliveries of the lost channel come back as redeliveries (here or to
                # another worker) and can no longer be settled here: stop their sends,
                # or each would be mailed twice.
                self._abandon_in_flight()
                # Start with the next broker: this one just failed us.
                index = (index + 1) % len(self.broker.urls)
                stop.wait(delay)
            finally:
                self.metrics.broker_connected.set(0)
                if connection is not None:
                    _close_quietly(connection)

    def _consume(self, connection: Connection, stop: threading.Event) -> None:
        channel = connection.channel()
        # Bodies stay bytes: py-amqp would otherwise turn a body that names a
        # content_encoding into str.
        channel.auto_decode = False
        try:
            declare_topology(channel)
        except _PRECONDITION_FAILED as exc:
            raise TopologyMismatch(
                f"broker has {WORK_QUEUE} or a related name with other arguments: {exc}"
            ) from None
        self._settler = Settler(connection)
        channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch, a_global=False)
        # py-amqp's consumer, not kombu's: see Delivery.
        tag = channel.basic_consume(WORK_QUEUE, callback=self._on_message, no_ack=False)
        # Only now is the worker useful: topology declared and deliveries flowing.
        self.metrics.broker_connected.set(1)
        log.info("consuming %s with prefetch %d", WORK_QUEUE, self.prefetch)
        try:
            while not stop.is_set():
                self._drain(connection)
        except _RECONNECT_ON:
            self._settle_before_leaving()
            raise
        channel.basic_cancel(tag)
        deadline = time.monotonic() + self.shutdown_grace
        if self._in_flight:
            log.info(
                "stopping: waiting up to %.0fs for %d in-flight mails",
                self.shutdown_grace,
                len(self._in_flight),
            )
        while self._in_flight and time.monotonic() < deadline:
            self._drain(connection)
        if self._in_flight:
            log.warning(
                "stopping with %d mails unsettled; the broker will redeliver them",
                len(self._in_flight),
            )
            # Stop their sends before the channel closes and the broker hands the
            # messages to another worker, or both would mail them.
            self._abandon_in_flight()

    def _drain(self, connection: Connection) -> None:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=_DRAIN_TIMEOUT)
        connection.heartbeat_check()
        self._settle_finished()

    def _on_message(self, raw: amqp.Message) -> None:
        delivery = Delivery(raw, time.monotonic())
        self.metrics.consumed.inc()
        future = asyncio.run_coroutine_threadsafe(
            self.pipeline.handle(delivery.body, delivery.headers, received=delivery.received),
            self.loop,
        )
        self._in_flight[future] = delivery
        future.add_done_callback(self._done.put)

    def _settle_finished(self) -> None:
        while True:
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                return
            delivery = self._in_flight.pop(future, None)
            if delivery is None:
                continue  # delivered on a connection that is gone; it will come again
            if future.cancelled():
                continue  # left unacked: the broker gives it to the next consumer
            try:
                outcome = future.result()
            except Exception:
                # Unacked it would hold a prefetch slot; requeued it could loop. The
                # broker's delivery limit backs this up for what crashes the process.
                log.exception("unexpected error handling a message; dead-lettering it")
                self.metrics.failed.labels("render").inc()
                outcome = Outcome("dead_letter", "render", headers=delivery.headers)
            assert self._settler is not None
            try:
                self._settler.settle(delivery, outcome)
            except SettleError as exc:
                # Only this message's next home failed (a nack, a refused or unconfirmed
                # publish): give back only it, and keep the channel for the others.
                log.error(
                    "could not settle %s (%s): %s; returning it to the queue",
                    _describe_delivery(delivery),
                    outcome.action,
                    exc,
                )
                delivery.requeue()
                continue
            if outcome.action == "retry":
                self.metrics.retries.labels("delayed").inc()
            elif outcome.action == "dead_letter":
                self.metrics.dead_lettered.labels(outcome.reason or "render").inc()

    def _abandon_in_flight(self) -> None:
        """Cancel the sends of messages this worker can no longer settle. A mail already
        inside DATA may still reach the relay: the redelivery then sends it again."""
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()

    def _settle_before_leaving(self) -> None:
        """Before a reconnect: settle what already finished, if the connection still
        takes it, so that those messages are not handed back and charged again."""
        try:
            self._settle_finished()
        except _RECONNECT_ON as exc:
            log.debug("could not settle finished work before reconnecting: %s", describe(exc))


def _describe_delivery(delivery: Delivery) -> str:
    # The producer sets message_id to the event id; it is the only name a message has
    # before (or without) decoding. repr() keeps a hostile one on one line.
    message_id = delivery.properties.get("message_id")
    if isinstance(message_id, str) and message_id:
        return f"message {message_id[:64]!r}"
    return "a message without message_id"


# What py-amqp raises when the broker or the connection goes away (kombu lists the same
# per connection, but we need them before a connection exists).
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    amqp.exceptions.ConnectionError,
    amqp.exceptions.ChannelError,
    amqp.exceptions.RecoverableConnectionError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    TimeoutError,
)


_PRECONDITION_FAILED: type[BaseException] = amqp.exceptions.PreconditionFailed
# Anything that means "this connection is no good": reconnect with backoff. A failed
# settle publish is one too, as its message must stay unacked and come back.
_RECONNECT_ON: tuple[type[BaseException], ...] = (*_BROKER_ERRORS, OSError, SettleError)


def _close_quietly(connection: Connection) -> None:
    try:
        connection.release()
    except Exception as exc:
        log.debug("ignoring error while closing broker connection: %s", exc)
