"""The broker, behind one door: connecting with failover over ``[broker] urls``, declaring
the topology, consuming, and publishing with confirms. py-amqp and kombu are used here
and nowhere above: what they raise leaves this module as :class:`BrokerUnavailable`
(the connection or channel is no good: reconnect), :class:`TopologyMismatch` (the broker
has our names with other arguments: an operator must decide) or
:class:`PublishNotConfirmed` (one publish has no certain home; the connection may be fine).

A :class:`Broker` holds one connection, and every call on it must come from the one
thread that owns it (kombu channels are not thread-safe, and heartbeats are only sent
while that thread services the connection; see docs/design.md). A second consumer is one
more :meth:`Broker.consume` on the same connection; more confirmed publishes go through
:meth:`Broker.publish_confirmed`, :meth:`Broker.publish_each_confirmed` for several at once,
or :class:`ConfirmedPublisher` for many in flight.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from time import monotonic
from typing import Any, Final, NamedTuple

import amqp
import amqp.exceptions
import kombu.exceptions
from kombu import Connection

from shared.config import BrokerConfig, BrokerUrl
from shared.errors import ClusteralertError, describe
from shared.topology import BINDINGS, EXCHANGES, QUEUES, UNBINDINGS

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerUnavailable",
    "ConfirmedPublisher",
    "Delivery",
    "Outgoing",
    "PublishNotConfirmed",
    "TopologyMismatch",
    "Unsettled",
    "ack_all",
    "connect_any",
    "copy_properties",
    "declare_topology",
    "talking",
]

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT: Final = 30.0
# Methods (a delivery is one, in three frames) one drain dispatches at most when they are
# already there: enough that a burst of deliveries costs one pass of the owner loop, few
# enough that settles, heartbeats and the incident stage's deadlines are not held up.
METHODS_PER_DRAIN: Final = 64
# How long a read that input started may wait for the rest of its method. A heartbeat
# frame starts a read but completes no method: the read must not then wait for the next
# one, with settles and the wake-up unattended, for the whole of a long drain timeout.
_READ_TIMEOUT: Final = 0.02
# Settled tags an Unsettled keeps behind an unsettled one before it drops them.
_COMPACT_FROM: Final = 64
_COPIED_PROPERTIES: Final = (
    "content_type",
    "content_encoding",
    "message_id",
    "timestamp",
    "correlation_id",
    "app_id",
)


class BrokerError(ClusteralertError):
    """Base of what this module raises."""


class BrokerUnavailable(BrokerError):
    """The broker went away, refused us or did not answer: this connection is no good."""


class TopologyMismatch(BrokerError):
    """The broker has our names with other arguments; retrying will not fix it."""


class PublishNotConfirmed(BrokerError):
    """The broker did not confirm one publish (a nack, a return, a timeout)."""


# What py-amqp and kombu raise when the broker or the connection goes away.
_BROKER_ERRORS: Final[tuple[type[BaseException], ...]] = (
    amqp.exceptions.AMQPError,
    kombu.exceptions.OperationalError,
    OSError,  # includes ConnectionError and TimeoutError
)


@contextlib.contextmanager
def talking() -> Iterator[None]:
    """Around broker calls only: what the client library raises becomes
    :class:`BrokerUnavailable`, as one line. The caller's own errors (a closed stdout,
    say) must stay what they are, so this wraps nothing else."""
    try:
        yield
    except amqp.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"broker error: {describe(exc)}") from exc
    except _BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"the broker stopped answering: {describe(exc)}") from exc


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


def connect_any(
    config: BrokerConfig,
    start: int = 0,
    *,
    retries: int = 1,
    io_timeout: float | None = None,
    on_failure: Callable[[BrokerUrl, str], None] | None = None,
) -> tuple[Connection, int]:
    """Connect to the first broker that answers, trying every URL in turn from ``start``
    (each ``1 + retries`` times, as kombu spaces them). Returns the connection and the
    index of its URL; raises :class:`BrokerUnavailable` naming every failure.
    ``io_timeout`` bounds every later socket read and write (for commands, which have no
    heartbeat to notice a broker that stopped answering). ``on_failure`` hears of each
    URL that did not answer."""
    failures: list[str] = []
    count = len(config.urls)
    for offset in range(count):
        index = (start + offset) % count
        url = config.urls[index]
        connection = kombu_connection(config, url)
        try:
            connection.ensure_connection(max_retries=retries, reraise_as_library_errors=False)
            if io_timeout is not None:
                connection.connection.sock.settimeout(io_timeout)
        except (*connection.connection_errors, *_BROKER_ERRORS) as exc:
            failures.append(f"{url}: {describe(exc)}")
            if on_failure is not None:
                on_failure(url, describe(exc))
            connection.collect()  # drops what was opened, without waiting on the network
            continue
        return connection, index
    raise BrokerUnavailable(f"cannot reach the broker: {'; '.join(failures)}")


def declare_topology(channel: Any) -> None:
    """Declare :mod:`shared.topology`. Idempotent on a broker that already has the same
    topology. A queue that exists with other arguments makes the broker close the channel
    (PRECONDITION_FAILED): changing a queue's type or limits needs an operator decision."""
    try:
        for exchange in EXCHANGES:
            channel.exchange_declare(
                exchange=exchange.name,
                type=exchange.type,
                durable=exchange.durable,
                auto_delete=False,
            )
        for queue in QUEUES:
            channel.queue_declare(
                queue=queue.name,
                durable=queue.durable,
                auto_delete=False,
                arguments=dict(queue.arguments),
            )
        for binding in BINDINGS:
            channel.queue_bind(
                queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
            )
        # Unbinding what does not exist is a no-op for RabbitMQ, so this stays idempotent.
        for old in UNBINDINGS:
            channel.queue_unbind(
                queue=old.queue, exchange=old.exchange, routing_key=old.routing_key
            )
    except amqp.exceptions.PreconditionFailed as exc:
        raise TopologyMismatch(
            f"broker has one of our queues or exchanges with other arguments: {exc}"
        ) from None


def copy_properties(properties: dict[str, Any], headers: dict[str, Any]) -> dict[str, Any]:
    """The properties to re-publish a message with: persistent, same identity."""
    copied = {k: properties[k] for k in _COPIED_PROPERTIES if properties.get(k) is not None}
    copied["delivery_mode"] = 2
    copied["application_headers"] = headers
    return copied


class Unsettled:
    """The delivery tags of one consuming channel not yet acked or given back, oldest
    first: what a ``multiple`` ack of a tag would reach (see :func:`ack_all`)."""

    __slots__ = ("_settled", "_tags")

    def __init__(self) -> None:
        self._tags: deque[int] = deque()  # in the order delivered, which is the tags' order
        # Settled, but behind an older one that is not: still in _tags.
        self._settled: set[int] = set()

    def __len__(self) -> int:
        return len(self._tags) - len(self._settled)

    def delivered(self, tag: int) -> None:
        self._tags.append(tag)

    def settled(self, tag: int) -> None:
        self._settled.add(tag)
        self._trim()
        self._compact()

    def settled_through(self, tag: int) -> None:
        """A ``multiple`` ack of ``tag``: every tag up to it is settled."""
        while self._tags and self._tags[0] <= tag:
            self._settled.discard(self._tags.popleft())
        self._trim()

    def take_run(self, tags: set[int]) -> int | None:
        """Settle ``tags``, and return the newest of them that, with what was settled
        before, ends the run of the oldest unsettled tags (one ``multiple`` ack of it
        settles that run and nothing else), or None; ``tags`` keeps the others."""
        newest = None
        queued, settled = self._tags, self._settled
        while queued and (queued[0] in tags or queued[0] in settled):
            tag = queued.popleft()
            if tag in tags:
                tags.discard(tag)
                newest = tag
            else:
                settled.discard(tag)
        settled.update(tags)
        self._compact()
        return newest

    def _trim(self) -> None:
        queued, settled = self._tags, self._settled
        while queued and queued[0] in settled:
            settled.discard(queued.popleft())

    def _compact(self) -> None:
        """Drop settled tags from behind an unsettled one once they are most of what is
        kept. They only let a run step over them, which it can as well where they are
        gone; kept, they would grow with the traffic behind an event held for a storm
        window or a mail hanging in DATA, not with the prefetch."""
        settled = self._settled
        if len(settled) > _COMPACT_FROM and 2 * len(settled) > len(self._tags):
            self._tags = deque(tag for tag in self._tags if tag not in settled)
            settled.clear()


class Delivery:
    """One message as py-amqp handed it over, untouched: kombu's own Message would
    inflate a body with a ``compression`` header before anyone could check its size."""

    __slots__ = (
        "_channel",
        "_unsettled",
        "body",
        "delivery_tag",
        "headers",
        "properties",
        "received",
        "redelivered",
        "routing_key",
    )

    def __init__(self, raw: amqp.Message, received: float, unsettled: Unsettled | None = None):
        self._channel = raw.channel
        self.delivery_tag: int = raw.delivery_tag
        # The key it was published with: who may publish under a key, the broker checks.
        self.routing_key: str = str(raw.delivery_info.get("routing_key", ""))
        self.body: bytes = raw.body
        self.properties: dict[str, Any] = dict(raw.properties)
        self.headers: dict[str, Any] = dict(self.properties.get("application_headers") or {})
        self.received = received
        # The broker gave it out before (to a worker that died, say, or back by a reject).
        self.redelivered = bool(raw.delivery_info.get("redelivered"))
        # Its channel's unsettled deliveries, which it joins (None: not tracked, and
        # never part of an ack_all).
        self._unsettled = unsettled
        if unsettled is not None:
            unsettled.delivered(self.delivery_tag)

    def ack(self, *, multiple: bool = False) -> None:
        """Ack this message (with ``multiple``, also every earlier one of its channel)."""
        with talking():
            self._channel.basic_ack(self.delivery_tag, multiple=multiple)
        if self._unsettled is not None:
            if multiple:
                self._unsettled.settled_through(self.delivery_tag)
            else:
                self._unsettled.settled(self.delivery_tag)

    def requeue(self) -> None:
        """Give this one message back; the broker charges it, and only it, a delivery."""
        with talking():
            self._channel.basic_reject(self.delivery_tag, requeue=True)
        if self._unsettled is not None:
            self._unsettled.settled(self.delivery_tag)


def ack_all(deliveries: Sequence[Delivery]) -> None:
    """Ack every one of ``deliveries``, all of one channel: those that, with what was
    settled before, are the oldest unsettled deliveries of the channel in one
    ``multiple`` ack, the others one by one. A ``multiple`` ack never reaches a delivery
    that is not being acked here or settled already: one an incident still holds, say,
    which a crash must give back to the broker."""
    if not deliveries:
        return
    first = deliveries[0]
    unsettled, channel = first._unsettled, first._channel
    if unsettled is None or any(d._unsettled is not unsettled for d in deliveries):
        for delivery in deliveries:
            delivery.ack()
        return
    tags = {delivery.delivery_tag for delivery in deliveries}
    # Counted as settled before the acks go out: should one fail, the channel and its
    # tracker are done with anyway.
    newest = unsettled.take_run(tags)
    with talking():
        if newest is not None:
            channel.basic_ack(newest, multiple=True)
        for tag in sorted(tags):
            channel.basic_ack(tag)


class ConfirmedPublisher:
    """A confirm-mode channel with many publishes in flight, for bulk work such as the
    DLQ commands: waiting for each confirm in turn would cost a round trip per message.
    Each publish's ``on_confirmed`` runs once the broker confirms it; :meth:`flush` waits
    for all of them. After a nack or a return nothing more counts as confirmed (a return
    comes before the ack of the same publish), and :meth:`flush` raises
    :class:`PublishNotConfirmed`. The channel is free for other calls (gets, acks)."""

    def __init__(self, connection: Connection, timeout: float):
        self._connection = connection.connection  # py-amqp's, for raw confirm events
        self._timeout = timeout
        with talking():
            self.channel = self._connection.channel()
            self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._published = 0
        # Publish sequence number -> what to do once it is confirmed.
        self._awaiting: dict[int, Callable[[], None]] = {}
        self._failure: str | None = None

    @property
    def pending(self) -> int:
        return len(self._awaiting)

    def publish(
        self,
        body: bytes,
        properties: dict[str, Any],
        exchange: str,
        routing_key: str,
        on_confirmed: Callable[[], None],
    ) -> None:
        message = amqp.Message(body, **properties)
        with talking():
            self.channel.basic_publish(
                message, exchange=exchange, routing_key=routing_key, mandatory=True
            )
        self._published += 1
        self._awaiting[self._published] = on_confirmed

    def flush(self) -> None:
        """Wait until every publish is confirmed (and its ``on_confirmed`` has run)."""
        while self._awaiting and self._failure is None:
            with talking():
                self._connection.drain_events(timeout=self._timeout)
        if self._failure is not None:
            raise PublishNotConfirmed(self._failure)

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        if self._failure is not None:
            return
        confirmed = [s for s in self._awaiting if s <= delivery_tag] if multiple else [delivery_tag]
        for sequence in confirmed:
            on_confirmed = self._awaiting.pop(sequence, None)
            if on_confirmed is not None:
                on_confirmed()

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._failure = "the broker refused a publish (nack)"

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._failure = f"no queue took a publish to {routing_key!r} (returned)"


class Outgoing(NamedTuple):
    """One message for :meth:`Broker.publish_each_confirmed`."""

    body: bytes
    properties: dict[str, Any]
    exchange: str
    routing_key: str


class _Batch:
    """The publishes of one :meth:`Broker.publish_each_confirmed` call."""

    def __init__(self, messages: Sequence[Outgoing]):
        self.messages = messages
        self.results: list[str | None] = [None] * len(messages)
        self.awaiting: dict[int, int] = {}  # publish sequence number -> index

    def same(self, index: int, message: Any) -> bool:
        mine = self.messages[index]
        return bool(
            mine.body == message.body
            and mine.properties.get("message_id") == message.properties.get("message_id")
        )


class Broker:
    """One connection at a time, to whichever of ``[broker] urls`` answers, with its
    consuming channels and one confirmed publishing channel. Owner thread only."""

    def __init__(self, config: BrokerConfig):
        self.config = config
        self.index = 0  # of the URL connected to, or to try first
        self._connection: Connection | None = None
        # Confirm-mode channels by lane (see publish_confirmed).
        self._publish_channels: dict[str, Any] = {}
        self._batch_channel: Any = None
        self._batch_sequence = 0
        self._batch: _Batch | None = None

    @property
    def url(self) -> BrokerUrl:
        return self.config.urls[self.index]

    def connect(self, on_failure: Callable[[BrokerUrl, str], None] | None = None) -> None:
        """Connect (trying from the current URL on), then declare the topology."""
        self.close()
        self._connection, self.index = connect_any(self.config, self.index, on_failure=on_failure)
        with talking():
            channel = self._connection.channel()
            declare_topology(channel)
            channel.close()

    def fail_over(self) -> None:
        """Next time, start with the next broker: this one just failed us."""
        self.index = (self.index + 1) % len(self.config.urls)

    def consume(
        self,
        queue: str,
        callback: Callable[[Delivery], None],
        *,
        prefetch: int,
        arguments: dict[str, Any] | None = None,
    ) -> Callable[[], None]:
        """Deliveries of ``queue`` to ``callback``, on a channel of their own with
        ``prefetch`` unacked at most (a stream needs both the prefetch and acks, and
        ``arguments`` such as ``x-stream-offset``). Returns the function that cancels
        the consumer."""
        assert self._connection is not None
        with talking():
            channel = self._connection.channel()
            # Bodies stay bytes: py-amqp would otherwise turn a body that names a
            # content_encoding into str.
            channel.auto_decode = False
            channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, a_global=False)
            unsettled = Unsettled()  # this channel's, as delivery tags are
            # py-amqp's consumer, not kombu's: see Delivery.
            tag = channel.basic_consume(
                queue,
                callback=lambda raw: callback(Delivery(raw, monotonic(), unsettled)),
                no_ack=False,
                arguments=arguments,
            )

        def cancel() -> None:
            with talking():
                channel.basic_cancel(tag)

        return cancel

    def drain(self, timeout: float, wake: socket.socket | None = None) -> None:
        """Dispatch what arrives within ``timeout`` seconds (every method already there,
        up to :data:`METHODS_PER_DRAIN`), and keep heartbeats going. ``wake``: a
        non-blocking socket that another thread writes to when it has work for the owner
        thread (a finished mail to settle); its bytes end the wait at once, and are
        consumed here."""
        assert self._connection is not None
        read_timeout = min(timeout, _READ_TIMEOUT)
        with talking():
            sock = self._connection.connection.transport.sock
            poller = _poller(sock, wake)  # one for the whole drain
            if _wait_for_input(sock, wake, timeout, poller):
                for _ in range(METHODS_PER_DRAIN):
                    try:
                        self._connection.drain_events(timeout=read_timeout)
                    except TimeoutError:
                        break
                    # A wake-up meanwhile is left for the next drain's wait.
                    if not _wait_for_input(sock, None, 0.0, poller):
                        break
            self._connection.heartbeat_check()

    def publish_confirmed(
        self,
        body: bytes,
        properties: dict[str, Any],
        exchange: str,
        routing_key: str,
        *,
        lane: str = "mail",
    ) -> None:
        """Publish with ``mandatory`` and wait for the broker's confirm; raise
        :class:`PublishNotConfirmed` on a nack, a return or no answer. Each ``lane`` has
        a channel of its own: the silences stream's records do not share the channel of
        notifications and settles, so that one lane's failure (which closes its channel)
        and RabbitMQ's per-channel caching of permission checks stay that lane's."""
        assert self._connection is not None
        # A channel of its own in confirm mode: consuming channels stay unconfirmed, and
        # a publish failure closes only this one.
        with talking():
            channel = self._publish_channels.get(lane)
            if channel is None or not channel.is_open:
                channel = self._connection.channel()
                channel.confirm_select()
                self._publish_channels[lane] = channel
        message = amqp.Message(body, **properties)
        try:
            channel.basic_publish_confirm(
                message,
                exchange=exchange,
                routing_key=routing_key,
                mandatory=True,
                confirm_timeout=CONFIRM_TIMEOUT,
            )
        except Exception as exc:
            # A fresh channel next time, as a late confirm of this publish must not be
            # taken for the next one's. A nack or a return leaves this one open: close
            # it rather than leak a channel per failed publish. (Not after a timeout or a
            # socket error: the close would wait on a broker that does not answer.)
            self._publish_channels.pop(lane, None)
            if not isinstance(exc, OSError) and channel.is_open:
                with contextlib.suppress(Exception):
                    channel.close()
            raise PublishNotConfirmed(
                f"publish to {exchange or 'default exchange'} ({routing_key}) not confirmed: {exc}"
            ) from exc

    def publish_each_confirmed(self, messages: Sequence[Outgoing]) -> list[str | None]:
        """Publish every message with ``mandatory``, all before waiting, then wait for
        their confirms together: one round trip for the lot where :meth:`publish_confirmed`
        costs one each. Returns, in order, None for each message the broker confirmed and
        why not for each other one (a nack, a return, no answer): unlike
        :class:`ConfirmedPublisher`, one refusal says nothing of the others."""
        assert self._connection is not None
        if not messages:
            return []
        batch = _Batch(messages)
        try:
            with talking():
                channel = self._batch_channel_open()
            self._batch = batch
            with _writes_joined(self._connection.connection.transport):
                for index, (body, properties, exchange, routing_key) in enumerate(messages):
                    channel.basic_publish(
                        amqp.Message(body, **properties),
                        exchange=exchange,
                        routing_key=routing_key,
                        mandatory=True,
                    )
                    self._batch_sequence += 1
                    batch.awaiting[self._batch_sequence] = index
            deadline = monotonic() + CONFIRM_TIMEOUT
            while batch.awaiting:
                left = deadline - monotonic()
                if left <= 0:
                    raise TimeoutError(f"no confirm within {CONFIRM_TIMEOUT:g}s")
                self._connection.connection.drain_events(timeout=left)
        except Exception as exc:
            # What is still unconfirmed has no certain home. A fresh channel next time (a
            # late confirm must not count for a later publish), closed as in
            # publish_confirmed.
            channel, self._batch_channel = self._batch_channel, None
            if channel is not None and not isinstance(exc, OSError) and channel.is_open:
                with contextlib.suppress(Exception):
                    channel.close()
            for index in batch.awaiting.values():
                batch.results[index] = f"not confirmed: {describe(exc)}"
            batch.awaiting.clear()
        finally:
            self._batch = None
        return batch.results

    def _batch_channel_open(self) -> Any:
        channel = self._batch_channel
        if channel is not None and channel.is_open:
            return channel
        assert self._connection is not None
        channel = self._connection.channel()
        channel.confirm_select()
        # The broker numbers a confirm channel's publishes from 1.
        self._batch_sequence = 0
        # Each handler knows its channel: a channel given up on (no confirm in time) stays
        # open, as closing it would wait on the broker, and its confirms may still come,
        # numbered as the next channel's publishes are. They must not count for those.
        channel.events["basic_ack"].add(functools.partial(self._on_batch_ack, channel))
        channel.events["basic_nack"].add(functools.partial(self._on_batch_nack, channel))
        channel.events["basic_return"].add(functools.partial(self._on_batch_return, channel))
        self._batch_channel = channel
        return channel

    def _confirmed(
        self, channel: Any, delivery_tag: int, multiple: bool, failure: str | None
    ) -> None:
        batch = self._batch
        if batch is None or channel is not self._batch_channel:
            return
        tags = [s for s in batch.awaiting if s <= delivery_tag] if multiple else [delivery_tag]
        for sequence in tags:
            index = batch.awaiting.pop(sequence, None)
            if index is not None and failure is not None:
                batch.results[index] = failure

    def _on_batch_ack(self, channel: Any, delivery_tag: int, multiple: bool) -> None:
        self._confirmed(channel, delivery_tag, multiple, None)

    def _on_batch_nack(self, channel: Any, delivery_tag: int, multiple: bool) -> None:
        self._confirmed(channel, delivery_tag, multiple, "the broker refused it (nack)")

    def _on_batch_return(
        self, channel: Any, exc: Exception, exchange: str, routing_key: str, message: Any
    ) -> None:
        # A return names no publish; it comes before the ack of the one it returns, so
        # that one is still awaited: the first awaited publish with the same body and
        # message id (two such would be the same notification).
        batch = self._batch
        if batch is None or channel is not self._batch_channel:
            return
        for index in batch.awaiting.values():
            if batch.results[index] is None and batch.same(index, message):
                batch.results[index] = f"no queue took it ({routing_key!r}, returned)"
                return

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._publish_channels = {}
        self._batch_channel = None
        if connection is not None:
            _close_quietly(connection)


@contextlib.contextmanager
def _writes_joined(transport: Any) -> Iterator[None]:
    """Within the block, py-amqp's writes to ``transport`` are kept, and sent as one
    when it ends. py-amqp sends each publish with a write of its own, and a write is a
    system call that also lets the mail loop's thread take the interpreter lock: for the
    incident stage's notifications that was about a tenth of the worker's CPU. py-amqp
    hands over a view of a buffer it reuses, hence the copy. The writes go out even when
    the block fails: each is whole frames, and what the broker did with them is what its
    confirms say."""
    chunks: list[bytes] = []
    # Plain TCP sets the socket's sendall as the transport's own _write; TLS has a method.
    own = transport.__dict__.get("_write")
    transport._write = lambda data: chunks.append(bytes(data))
    try:
        yield
    finally:
        if own is None:
            del transport._write
        else:
            transport._write = own
        if chunks:
            transport.write(b"".join(chunks))


def _poller(sock: socket.socket, wake: socket.socket | None) -> select.poll:
    # poll, not select: select refuses descriptors from 1024 up.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if wake is not None:
        poller.register(wake, select.POLLIN)
    return poller


def _wait_for_input(
    sock: socket.socket,
    wake: socket.socket | None,
    timeout: float,
    poller: select.poll | None = None,
) -> bool:
    """Whether the broker's socket has input, waiting up to ``timeout`` for it or for
    ``wake`` (``poller``: one from :func:`_poller` for both, to reuse). py-amqp reads
    exactly the bytes of the frame it is on, so what it has not read is still in the
    kernel, where poll sees it; but TLS may have decrypted a record holding more frames
    than the one read, which only ``pending()`` shows."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    if poller is None:
        poller = _poller(sock, wake)
    ready = {fd for fd, _ in poller.poll(max(0, round(timeout * 1000)))}
    if wake is not None and wake.fileno() in ready:
        # One read: wake-ups beyond it only end the next wait early, which is harmless.
        with contextlib.suppress(BlockingIOError):
            wake.recv(4096)
    # An error or hang-up counts too: the read that follows raises it.
    return sock.fileno() in ready


def _close_quietly(connection: Connection) -> None:
    try:
        connection.release()
    except Exception as exc:
        log.debug("ignoring error while closing broker connection: %s", exc)
