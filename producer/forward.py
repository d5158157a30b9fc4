"""The node agent's forwarder: publishes spooled events to RabbitMQ and deletes each
file only after the broker confirmed it.

Publishing uses publisher confirms and ``mandatory``, so a message that reaches no queue
comes back instead of vanishing. On a fresh install the exchange or the work queue may
not exist yet: the event then stays in the spool and is retried with backoff, as it is
when the broker is down.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from producer.spool import Spool
from producer.watch import SpoolWatcher
from shared.config import BrokerConfig
from shared.event import decode_event, routing_key
from shared.tls import client_context
from shared.topology import EVENTS_EXCHANGE

__all__ = ["Forwarder", "connection_parameters"]

log = logging.getLogger(__name__)

_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
_TICK = 0.5  # how often the idle loop services heartbeats and checks for stop

# Connection-level failures: reconnect. Channel-level failures keep the connection.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.StreamLostError,
    ConnectionError,
    socket.timeout,
)


class _Blocked(Exception):
    """The head of the spool cannot be published right now; retry after a backoff."""


def connection_parameters(config: BrokerConfig) -> list[Any]:
    """pika parameters for each configured broker, in failover order."""
    params = []
    hostname = socket.gethostname()
    for url in config.urls:
        ssl_options = None
        if url.scheme == "amqps":
            context = client_context(config.ca_file, config.cert_file, config.key_file)
            ssl_options = pika.SSLOptions(context, server_hostname=url.host)
        params.append(
            pika.ConnectionParameters(
                host=url.host,
                port=url.port,
                virtual_host=url.vhost,
                credentials=pika.PlainCredentials(
                    url.username, url.password.reveal() if url.password else ""
                ),
                heartbeat=config.heartbeat,
                blocked_connection_timeout=60,
                connection_attempts=1,
                socket_timeout=config.connect_timeout,
                ssl_options=ssl_options,
                client_properties={"connection_name": f"clusteralert-producer@{hostname}"},
            )
        )
    return params


class Forwarder:
    def __init__(
        self,
        spool: Spool,
        broker: BrokerConfig,
        *,
        max_backoff: float = _MAX_BACKOFF,
        tick: float = _TICK,
    ):
        self.spool = spool
        self.broker = broker
        self._stop = threading.Event()
        self._watcher: SpoolWatcher | None = None
        self.published = 0
        self.held_back = 0  # times the spool head could not be published yet
        self.passes = 0  # complete passes over the spool
        self._connection: Any = None
        self._channel: Any = None
        self._backoff = _MIN_BACKOFF
        self._max_backoff = max_backoff
        self._tick = tick

    def run(self) -> None:
        """Forward until :meth:`stop`, surviving broker outages."""
        self.spool.ensure()
        watcher = self._watcher = SpoolWatcher(self.spool.directory)
        if self._stop.is_set():
            watcher.close()
            return
        retry_at = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= retry_at:
                    try:
                        self._ensure_channel()
                        self._forward_pending()
                        self.passes += 1
                        self._backoff = _MIN_BACKOFF
                        retry_at = 0.0
                    except _Blocked as exc:
                        self.held_back += 1
                        retry_at = self._schedule_retry(str(exc))
                    except _CONNECTION_ERRORS as exc:
                        self._drop_connection()
                        retry_at = self._schedule_retry(f"broker unreachable: {_describe(exc)}")
                # Idle ticks rescan the spool too, which also covers missed notifications.
                watcher.wait(self._tick)
                self._service_heartbeats()
        finally:
            watcher.close()
            self._drop_connection()

    def stop(self) -> None:
        """Ask :meth:`run` to return soon; safe from a signal handler or another thread."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.wake()

    def _schedule_retry(self, why: str) -> float:
        delay = self._backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
        log.warning("%s; retrying in %.1fs", why, delay)
        self._backoff = min(self._backoff * 2, self._max_backoff)
        return time.monotonic() + delay

    def _ensure_channel(self) -> None:
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(connection_parameters(self.broker))
            # pika keeps the parameters it connected with only on its internal object.
            params = getattr(getattr(self._connection, "_impl", None), "params", None)
            where = f"{params.host}:{params.port} vhost {params.virtual_host}" if params else ""
            log.info("connected to broker %s", where)
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()

    def _drop_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                if connection.is_open:
                    connection.close()
            except Exception as exc:
                log.debug("ignoring error while closing broker connection: %s", exc)

    def _service_heartbeats(self) -> None:
        if self._connection is not None and self._connection.is_open:
            try:
                self._connection.process_data_events(time_limit=0)
            except _CONNECTION_ERRORS as exc:
                log.warning("broker connection lost: %s", _describe(exc))
                self._drop_connection()

    def _forward_pending(self) -> None:
        for path in self.spool.pending():
            if self._stop.is_set():
                return
            self._forward_one(path)

    def _forward_one(self, path: Path) -> None:
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return  # another forwarder instance already sent it
        except OSError as exc:
            # e.g. a file written by another user with no read permission for us: keep it
            # and keep going with backoff rather than crash-looping on the oldest file.
            raise _Blocked(f"cannot read spool file {path.name}: {exc.strerror}") from None
        try:
            event = decode_event(body)
        except Exception as exc:
            self._set_aside(path, exc)
            return
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=event.id,
            timestamp=int(event.time.timestamp()),
        )
        try:
            self._channel.basic_publish(
                EVENTS_EXCHANGE, routing_key(event), body, properties=properties, mandatory=True
            )
        except pika.exceptions.UnroutableError:
            raise _Blocked(
                f"event {event.id} reached no queue (is a worker running to "
                f"declare {EVENTS_EXCHANGE}'s queue?); kept in spool"
            ) from None
        except pika.exceptions.NackError:
            raise _Blocked(f"broker refused event {event.id}; kept in spool") from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            raise _Blocked(
                f"broker closed the channel ({exc.reply_code} {exc.reply_text}); "
                f"event {event.id} kept in spool"
            ) from None
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # Published but not removable: it will be sent again (a duplicate with the same
            # Message-ID), which beats stopping the node's alerts.
            raise _Blocked(f"cannot remove forwarded {path.name}: {exc.strerror}") from None
        self.published += 1
        log.info("forwarded event %s %s from %s", event.id, event.key, path.name)

    def _set_aside(self, path: Path, error: BaseException) -> None:
        try:
            target = self.spool.reject(path)
        except OSError as exc:
            raise _Blocked(
                f"cannot set aside invalid spool file {path.name}: {exc.strerror}"
            ) from None
        log.error(
            "spool file %s is not a valid event (%s); moved to %s",
            path.name,
            _describe(error),
            target,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # ssl errors are long and repeat the reason; keep the log line to one line.
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or text
    return text.replace("\n", " ")[:300]
