"""Consume and settle: the bridge between kombu and the asyncio sender.

kombu channels are not thread-safe, and AMQP heartbeats are only sent while the thread
that owns the connection keeps servicing it. So one thread (the caller's) owns the
connection: it drains deliveries, hands each body to the pipeline on the asyncio loop
thread, and settles the results from a queue. Nothing on this thread waits for SMTP, so
a slow relay never stalls heartbeats, and acks are sent on the channel's own thread.
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

from kombu import Connection, Queue
from kombu import Consumer as KombuConsumer

from shared.config import BrokerConfig
from shared.errors import ClusteralertError
from shared.topology import WORK_QUEUE
from worker.declare import declare_topology
from worker.metrics import Metrics
from worker.pipeline import Outcome, Pipeline
from worker.settle import SettleError, Settler

__all__ = ["Consumer", "kombu_connection"]

log = logging.getLogger(__name__)

# How long one drain waits for a delivery before settling finished work and checking
# heartbeats. It bounds the delay of an ack, not of a mail.
_DRAIN_TIMEOUT = 0.02
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0


class TopologyMismatch(ClusteralertError):
    """The broker has our names with other arguments; retrying will not fix it."""


def kombu_connection(config: BrokerConfig) -> Connection:
    """One kombu connection over every configured broker URL, in failover order."""
    ssl_options: dict[str, Any] | bool = False
    if any(url.scheme == "amqps" for url in config.urls):
        ssl_options = {
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": str(config.ca_file) if config.ca_file else None,
            "certfile": str(config.cert_file) if config.cert_file else None,
            "keyfile": str(config.key_file) if config.key_file else None,
            "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
            # None makes kombu verify against the host of the URL it is connecting to.
            "server_hostname": None,
        }
    return Connection(
        [url.with_secret() for url in config.urls],
        heartbeat=config.heartbeat,
        connect_timeout=config.connect_timeout,
        ssl=ssl_options,
        failover_strategy="round-robin",
        transport_options={
            "client_properties": {"connection_name": f"clusteralert-worker@{socket.gethostname()}"}
        },
    )


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
        self._in_flight: dict[Future[Outcome], Any] = {}
        self._settler: Settler | None = None

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, reconnecting with backoff when the broker goes
        away. On stop: cancel the consumer, let in-flight mails finish within the grace
        period, settle them, and close; anything unsettled returns to the queue."""
        backoff = _MIN_BACKOFF
        while not stop.is_set():
            connection = kombu_connection(self.broker)
            try:
                connection.connect()
                log.info("connected to broker %s", connection.as_uri())
                backoff = _MIN_BACKOFF
                self._consume(connection, stop)
            except (
                *connection.connection_errors,
                *connection.channel_errors,
                OSError,
                SettleError,
            ) as exc:
                if _is_precondition_failed(exc):
                    raise TopologyMismatch(
                        f"broker has {WORK_QUEUE} or a related name with other arguments: {exc}"
                    ) from None
                self.metrics.broker_connected.set(0)
                delay = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
                log.warning(
                    "broker connection failed: %s; reconnecting in %.1fs", _one_line(exc), delay
                )
                backoff = min(backoff * 2, _MAX_BACKOFF)
                # Unsettled deliveries of the lost channel come back as redeliveries.
                self._in_flight.clear()
                stop.wait(delay)
            finally:
                self.metrics.broker_connected.set(0)
                _close_quietly(connection)

    def _consume(self, connection: Connection, stop: threading.Event) -> None:
        channel = connection.channel()
        declare_topology(channel)
        self._settler = Settler(connection)
        channel.basic_qos(prefetch_size=0, prefetch_count=self.prefetch, a_global=False)
        consumer = KombuConsumer(
            channel,
            queues=[Queue(WORK_QUEUE, no_declare=True)],
            on_message=self._on_message,
            no_ack=False,
            auto_declare=False,
        )
        consumer.consume()
        # Only now is the worker useful: topology declared and deliveries flowing.
        self.metrics.broker_connected.set(1)
        log.info("consuming %s with prefetch %d", WORK_QUEUE, self.prefetch)
        while not stop.is_set():
            self._drain(connection)
        consumer.cancel()
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
            self._in_flight.clear()

    def _drain(self, connection: Connection) -> None:
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=_DRAIN_TIMEOUT)
        connection.heartbeat_check()
        self._settle_finished()

    def _on_message(self, message: Any) -> None:
        self.metrics.consumed.inc()
        headers = dict(message.headers or {})
        future = asyncio.run_coroutine_threadsafe(
            self.pipeline.handle(message.body, headers), self.loop
        )
        self._in_flight[future] = message
        future.add_done_callback(self._done.put)

    def _settle_finished(self) -> None:
        while True:
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                return
            message = self._in_flight.pop(future, None)
            if message is None:
                continue  # delivered on a connection that is gone; it will come again
            try:
                outcome = future.result()
            except Exception:
                # Unacked it would hold a prefetch slot; requeued it could loop. The
                # broker's delivery limit backs this up for what crashes the process.
                log.exception("unexpected error handling a message; dead-lettering it")
                outcome = Outcome("dead_letter", "render", headers=message.headers)
            assert self._settler is not None
            self._settler.settle(message, outcome)
            if outcome.action == "retry":
                self.metrics.retries.labels("delayed").inc()
            elif outcome.action == "dead_letter":
                self.metrics.dead_lettered.labels(outcome.reason or "render").inc()


def _is_precondition_failed(exc: BaseException) -> bool:
    return getattr(exc, "reply_code", None) == 406 or getattr(exc, "code", None) == 406


def _one_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).replace("\n", " ")[:300]


def _close_quietly(connection: Connection) -> None:
    try:
        connection.release()
    except Exception as exc:
        log.debug("ignoring error while closing broker connection: %s", exc)
