"""The node agent's forwarder: publishes spooled events to RabbitMQ and deletes each
file only after the broker confirmed it.

Publishing uses publisher confirms and ``mandatory``, so a message that reaches no queue
comes back instead of vanishing. Confirms are pipelined: up to ``window`` events are in
flight at once and the broker acks them in batches, which drains a backlog many times
faster than waiting for each confirm in turn (pika's ``BlockingChannel`` can only do the
latter, so this runs on pika's ``SelectConnection`` and its I/O loop, which also watches
the spool and the stop pipe).

For an unroutable mandatory message the broker sends ``basic.return`` before its ack;
returns are paired with acks by the event id (the AMQP ``message_id``), and such an event
goes back to the spool. On a fresh install the exchange or the work queue may not exist
yet, and events wait in the spool with backoff, as they do when the broker is down.

Heartbeats take the same channel, with confirms, but never the spool: one is worth
something only while it is fresh. When one falls due while the broker is away, it is sent
(stamped anew) once the channel is back, and a refused one is not retried; the next one
follows an interval later.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop, PollEvents

from producer.spool import Claim, Spool
from producer.watch import FALLBACK_POLL, SpoolWatcher
from shared.backoff import Backoff
from shared.config import BrokerConfig
from shared.errors import SpoolError, describe
from shared.event import Event, encode_event, peek_event, routing_key
from shared.own_events import worker_only_key
from shared.tls import client_context
from shared.topology import EVENTS_EXCHANGE

__all__ = ["Forwarder", "connection_parameters", "printable"]

log = logging.getLogger(__name__)

_MIN_BACKOFF: Final = 0.5
_MAX_BACKOFF: Final = 30.0
_STOP_GRACE: Final = 5.0  # seconds to wait for outstanding confirms when stopping
DEFAULT_CONFIRM_TIMEOUT: Final = 30.0


def printable(text: str) -> str:
    """``text`` safe for a log line: control characters (CR, LF, ESC) and undecodable
    bytes of a file name escaped, so a crafted name cannot forge or hide log lines."""
    return text if text.isprintable() else ascii(text)[1:-1]


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
        window: int = 256,
        max_backoff: float = _MAX_BACKOFF,
        tick: float = 2.0,
        confirm_timeout: float = DEFAULT_CONFIRM_TIMEOUT,
        heartbeat: Callable[[], Event] | None = None,
        heartbeat_interval: float = 0.0,
    ):
        self.spool = spool
        self.broker = broker
        self.window = window
        # A broker that keeps the connection up but never answers (a minority
        # partition, a stuck quorum leader) gets this long per publish, then the agent
        # moves on to the next URL.
        self.confirm_timeout = confirm_timeout
        self.max_backoff = max_backoff
        self.tick = tick
        # Observable state, for status, metrics and tests.
        self.published = 0
        self.held_back = 0  # times publishing had to pause (unroutable, nack, no exchange)
        self.passes = 0  # times the loop found the spool drained
        self.set_aside = 0  # spool files that cannot be sent: invalid, unreadable, links
        self.connected = False
        self.last_error = ""
        self.last_error_time = 0.0
        self.last_publish_time = 0.0
        # A fresh heartbeat event each time (None or an interval of 0: none).
        self.heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.heartbeats_sent = 0
        self._heartbeat_due = False

        self._params = connection_parameters(broker)
        self._url_index = 0
        self._loop: Any = None
        self._watcher: SpoolWatcher | None = None
        self._claim: Claim | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._ready = False
        self._opening = False
        self._held = False
        # A publish the broker nacked: the channel is replaced before publishing again.
        self._refused = False
        self._renewing = False  # closing the channel on purpose, to open a new one
        self._stopping = False
        self._backoff = Backoff(_MIN_BACKOFF, max_backoff)
        self._next_tag = 1
        # Delivery tag: the claimed file (None for a heartbeat), its event id and when it
        # was published.
        self._in_flight: dict[int, tuple[Path | None, str, float]] = {}
        self._confirm_timer: Any = None
        self._channel_attempt = 0  # which channel opening a deadline belongs to
        self._failing_over = False
        # Returned (unroutable) publishes by event id, counted: two copies of one event
        # may be in flight at once.
        self._returned: Counter[str] = Counter()
        self._queue: deque[Path] = deque()
        self._dirty = True
        # Files that could be neither sent nor moved aside: left where they are, and
        # passed over until the agent restarts, so they hold up no other event.
        self._passed_over: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> None:
        """Forward until :meth:`stop`, surviving broker outages."""
        self.spool.ensure()
        for path, what in self.spool.recover_stale_tmp():
            log.warning("spool: %s: %s", what, printable(str(path)))
        released = self.spool.release_orphaned_claims()
        if released:
            log.info("spool: %d events claimed by a forwarder that died are back", released)
        self._claim = self.spool.new_claim()
        self._remover = Remover(lambda: self._loop.add_callback_threadsafe(self._pump))
        self._watcher = SpoolWatcher(self.spool.directory)
        self._loop = IOLoop()
        if self._watcher.uses_inotify:
            self._loop.add_handler(self._watcher.fileno(), self._on_spool_change, PollEvents.READ)
        self._loop.add_handler(self._watcher.wake_fileno(), self._on_wake, PollEvents.READ)
        self._loop.call_later(0, self._on_tick)
        if self.heartbeat is not None and self.heartbeat_interval:
            self._loop.call_later(0, self._on_heartbeat_timer)
        if self._stopping:
            self._watcher.wake()
        self._connect()
        try:
            self._loop.start()
        finally:
            # Confirmed files must be gone before the claim gives the rest back.
            self._remover.close()
            self._claim.close()
            self._watcher.close()
            self._write_status()

    def stop(self) -> None:
        """Ask :meth:`run` to finish: outstanding confirms get a few seconds, unconfirmed
        events stay in the spool. Safe from a signal handler or another thread."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.wake()

    def _on_wake(self, fd: int, events: int) -> None:
        assert self._watcher is not None
        self._watcher.consume_wake()
        if not self._stopping:
            return
        if self._connection is None or not self._connection.is_open:
            self._loop.stop()
            return
        if not self._in_flight:
            self._connection.close()
        self._loop.call_later(_STOP_GRACE, self._close_now)

    def _close_now(self) -> None:
        # Confirms still missing, or a close the broker never answered, after the
        # grace: waiting longer would wait for a silent broker, so drop the connection;
        # unconfirmed events stay in the spool.
        connection = self._connection
        if connection is not None and (connection.is_open or connection.is_closing):
            self._abort(connection, "stopping: the broker did not answer in time")

    # -- connection and channel ----------------------------------------------------------

    def _connect(self) -> None:
        if self._stopping:
            self._loop.stop()
            return
        params = self._params[self._url_index]
        self._connection = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._loop,
        )

    def _on_open(self, connection: Any) -> None:
        params = self._params[self._url_index]
        log.info(
            "connected to broker %s:%s vhost %s", params.host, params.port, params.virtual_host
        )
        self.connected = True
        self._open_channel()

    def _open_channel(self) -> None:
        self._opening = True
        self._channel_attempt += 1
        attempt = self._channel_attempt
        self._connection.channel(on_open_callback=self._on_channel_open)
        self._loop.call_later(self.confirm_timeout, lambda: self._check_channel(attempt))

    def _on_open_error(self, connection: Any, error: BaseException) -> None:
        self._connection = None
        self._note_error(f"broker {self._describe_url()} unreachable: {_cause(error)}")
        # Try the next broker; the backoff grows once the whole list has failed.
        self._url_index = (self._url_index + 1) % len(self._params)
        delay = 0.0 if self._url_index else self._next_backoff()
        self._loop.call_later(delay, self._connect)

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        self._connection = None
        self._channel = None
        self._ready = False
        self._opening = False
        self._renewing = False
        self.connected = False
        self._give_back_in_flight()
        if self._stopping:
            self._loop.stop()
            return
        if self._failing_over:
            # The reason was logged already; the next broker is tried at once.
            self._failing_over = False
            self._loop.call_later(0, self._connect)
            return
        self._note_error(f"broker connection lost: {describe(reason)}")
        self._loop.call_later(self._next_backoff(), self._connect)

    def _check_channel(self, attempt: int) -> None:
        """A channel (or its confirm mode) the broker never granted: fail over too."""
        if (
            attempt == self._channel_attempt
            and self._opening
            and self._connection is not None
            and self._connection.is_open
        ):
            self._fail_over(
                f"broker {self._describe_url()} opened no channel in "
                f"{self.confirm_timeout:g} s; trying the next broker"
            )

    def _check_confirms(self) -> None:
        self._confirm_timer = None
        if not self._in_flight or self._connection is None or not self._connection.is_open:
            return
        # Tags are inserted in publish order: the first is the oldest unconfirmed one.
        oldest = next(iter(self._in_flight.values()))[2]
        waited = time.monotonic() - oldest
        if waited < self.confirm_timeout:
            self._confirm_timer = self._loop.call_later(
                self.confirm_timeout - waited, self._check_confirms
            )
            return
        self._fail_over(
            f"broker {self._describe_url()} confirmed nothing for {self.confirm_timeout:g} s "
            f"({len(self._in_flight)} events waiting); events stay in the spool, "
            "trying the next broker"
        )

    def _fail_over(self, why: str) -> None:
        """Leave a broker that keeps the connection up but does not answer: its
        unconfirmed events go back to the spool (sent again, maybe twice, never lost)
        and the next URL is tried."""
        self._note_error(why)
        self._give_back_in_flight()
        self._url_index = (self._url_index + 1) % len(self._params)
        self._failing_over = True
        self._abort(self._connection, why)

    def _abort(self, connection: Any, why: str) -> None:
        """Drop ``connection`` without the AMQP close handshake, which a silent broker
        never completes. pika has no public call for this; its own heartbeat checker
        ends a dead connection the same way. ``_on_closed`` follows as usual."""
        connection._terminate_stream(pika.exceptions.AMQPConnectionError(why))

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, frame: Any) -> None:
        if self._channel is None or frame.channel_number != self._channel.channel_number:
            return  # a stale channel's late reply: its tags are not ours
        self._ready = True
        self._opening = False  # the channel is usable only once confirm mode is on
        self._next_tag = 1  # delivery tags count from 1 on every channel
        self._pump()
        self._send_heartbeat()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if self._channel is not None and channel is not self._channel:
            return  # not the channel we publish on
        self._channel = None
        self._ready = False
        self._opening = False
        self._give_back_in_flight()
        if self._stopping or self._connection is None or not self._connection.is_open:
            return
        if self._renewing:
            self._renewing = False
            self._open_channel()
            return
        # Typically 404: the exchange does not exist yet (fresh install).
        self._hold(f"broker closed the channel ({describe(reason)}); events stay in spool")

    def _reopen_channel(self) -> None:
        if (
            self._connection is not None
            and self._connection.is_open
            and self._channel is None
            and not self._opening
        ):
            self._open_channel()

    # -- publishing ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Publish spooled events until the confirm window is full."""
        if not self._ready or self._held or self._stopping:
            return
        assert self._claim is not None
        # Confirmed files still waiting to be deleted count against the window too: after
        # a kill -9 they are sent again, and duplicates must stay within one window.
        while len(self._in_flight) + self._remover.backlog < self.window:
            path = self._next_pending()
            if path is None:
                self.passes += 1
                return
            claimed = self._claim.take(path)
            if claimed is None:
                continue  # another forwarder took it
            try:
                body = self.spool.read_event(claimed)
                event_id, key = peek_event(body)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # Retrying a file the agent cannot read (another user's, mode 0600)
                # would only stall every event behind it.
                self._set_aside(claimed, f"cannot be read ({exc.strerror})")
                continue
            except Exception as exc:
                self._set_aside(claimed, f"is not a valid event ({describe(exc)})")
                continue
            if worker_only_key(key):
                # The broker would refuse it (403) every time, and the events behind it
                # and the heartbeats would wait forever.
                self._set_aside(claimed, f"has a routing key only workers publish ({key[:80]!r})")
                continue
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=event_id,
                timestamp=int(time.time()),
            )
            self._channel.basic_publish(
                EVENTS_EXCHANGE, key, body, properties=properties, mandatory=True
            )
            self._in_flight[self._next_tag] = (claimed, event_id, time.monotonic())
            self._next_tag += 1
            if self._confirm_timer is None:
                self._confirm_timer = self._loop.call_later(
                    self.confirm_timeout, self._check_confirms
                )

    def _on_heartbeat_timer(self) -> None:
        self._heartbeat_due = True
        self._send_heartbeat()
        self._loop.call_later(self.heartbeat_interval, self._on_heartbeat_timer)

    def _send_heartbeat(self) -> None:
        """Publish the heartbeat that is due, if the channel is up; else it waits for
        the channel (one at most: a later one replaces it)."""
        if not self._heartbeat_due or not self._ready or self._stopping:
            return
        assert self.heartbeat is not None
        self._heartbeat_due = False
        event = self.heartbeat()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Transient,
            message_id=event.id,
            timestamp=int(time.time()),
        )
        self._channel.basic_publish(
            EVENTS_EXCHANGE, routing_key(event), encode_event(event), properties, mandatory=True
        )
        self._in_flight[self._next_tag] = (None, event.id, time.monotonic())
        self._next_tag += 1
        if self._confirm_timer is None:
            self._confirm_timer = self._loop.call_later(self.confirm_timeout, self._check_confirms)

    def _next_pending(self) -> Path | None:
        if not self._queue and self._dirty:
            self._dirty = False
            self._queue.extend(p for p in self.spool.pending() if p.name not in self._passed_over)
        return self._queue.popleft() if self._queue else None

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # basic.return precedes the ack of the same message; the ack settles it.
        self._returned[properties.message_id] += 1

    def _settle_return(self, event_id: str) -> bool:
        """Whether the broker returned this publish of ``event_id``, forgetting that
        return: a key left at zero for every returned heartbeat would pile up until the
        next reconnect."""
        count = self._returned.pop(event_id, 0)
        if count > 1:
            self._returned[event_id] = count - 1
        return count > 0

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = (
            sorted(t for t in self._in_flight if t <= method.delivery_tag)
            if method.multiple
            else [method.delivery_tag]
        )
        problem = ""
        assert self._claim is not None
        for tag in tags:
            entry = self._in_flight.pop(tag, None)
            if entry is None:
                continue
            claimed, event_id, _ = entry
            if claimed is None:
                self._heartbeat_settled(event_id, acked)
                continue
            returned = self._settle_return(event_id)
            if acked and not returned:
                self.published += 1
                self._remover.remove(claimed)
                self.last_publish_time = time.time()
                log.info("forwarded event %s", event_id)
                continue
            if not returned:
                self._refused = True
            self._claim.give_back(claimed)
            problem = (
                f"event {event_id} reached no queue (is a worker running to declare "
                f"{EVENTS_EXCHANGE}'s queue?); kept in spool"
                if acked
                else f"broker refused event {event_id}; kept in spool"
            )
        if problem:
            self._hold(problem)
            return
        if tags:
            self._backoff.reset()
        if self._stopping and not self._in_flight and self._connection is not None:
            self._connection.close()
            return
        self._pump()

    def _heartbeat_settled(self, event_id: str, acked: bool) -> None:
        returned = self._settle_return(event_id)
        if acked and not returned:
            self.heartbeats_sent += 1
            log.debug("heartbeat %s confirmed", event_id)
            return
        # Not retried: the next interval brings a fresh one.
        log.warning(
            "heartbeat %s %s; the next one follows in %gs",
            event_id,
            "reached no queue" if acked else "was refused by the broker",
            self.heartbeat_interval,
        )

    def _give_back_in_flight(self) -> None:
        """Unconfirmed events return to the spool; they may be published twice, never lost."""
        if self._claim is not None:
            for claimed, _, _ in self._in_flight.values():
                if claimed is not None:  # a heartbeat is not given back, only forgotten
                    self._claim.give_back(claimed)
        self._in_flight.clear()
        self._returned.clear()
        self._queue.clear()
        self._dirty = True

    def _set_aside(self, claimed: Path, why: str) -> None:
        """Move a file that cannot be sent out of the way, counted and logged once."""
        self.set_aside += 1
        name = printable(claimed.name)
        try:
            target = self.spool.reject(claimed)
        except (OSError, SpoolError) as exc:
            assert self._claim is not None
            self._claim.give_back(claimed)
            self._passed_over.add(claimed.name)
            # An OSError's text holds the paths, and so the file's raw name.
            reason = exc.strerror if isinstance(exc, OSError) else describe(exc)
            self._note_error(
                f"spool file {name} {why}; cannot move it aside ({reason}), "
                "left in the spool and passed over until the agent restarts"
            )
            return
        log.error("spool file %s %s; moved to %s", name, why, printable(str(target)))

    # -- pauses, ticks and status -----------------------------------------------------------

    def _hold(self, why: str) -> None:
        """Stop publishing for a backoff: retrying at once would only spin."""
        self.held_back += 1
        if self._held:
            # The rest of a refused window: the pause and its log line are there already.
            return
        self._note_error(why)
        self._held = True
        self._loop.call_later(self._next_backoff(), self._release_hold)

    def _release_hold(self) -> None:
        self._held = False
        self._dirty = True
        if self._channel is None:
            self._reopen_channel()
        elif self._refused and not self._in_flight:
            # A quorum queue over its length limit tells the publishing channel to stop,
            # and goes on refusing that channel's publishes until the queue shrinks, even
            # once the limit is raised or lifted. A new channel is asked afresh.
            self._refused = False
            self._renewing = True
            self._ready = False
            self._channel.close()
        else:
            self._pump()

    def _next_backoff(self) -> float:
        return self._backoff.delay()

    def report_error(self, why: str) -> None:
        """Note a failure from another thread (a log follower): the status file and the
        last error belong to the I/O loop, so it is handed over there."""
        loop = self._loop
        if loop is None:
            log.warning("%s", why)
            return
        try:
            loop.add_callback_threadsafe(lambda: self._note_error(why))
        except Exception:  # the loop has just closed (shutdown): the log line still shows it
            log.warning("%s", why)

    def _note_error(self, why: str) -> None:
        self.last_error = why
        self.last_error_time = time.time()
        log.warning("%s", why)
        self._write_status()

    def _on_spool_change(self, fd: int, events: int) -> None:
        assert self._watcher is not None
        self._watcher.consume_changes()
        self._dirty = True
        self._pump()

    def _on_tick(self) -> None:
        """Periodic housekeeping; also covers a missed or unavailable spool watch."""
        try:
            for path, what in self.spool.recover_stale_tmp():
                log.warning("spool: %s: %s", what, printable(str(path)))
            if self.spool.release_orphaned_claims(own=self._claim):
                log.info("spool: took back events of a forwarder that died")
            self.spool.expire_seen()
        except OSError as exc:
            # Housekeeping must never take the agent down; it runs again next tick.
            self._note_error(f"spool housekeeping: {exc}")
        self._dirty = True
        self._pump()
        self._write_status()
        assert self._watcher is not None
        tick = self.tick if self._watcher.uses_inotify else min(self.tick, FALLBACK_POLL)
        self._loop.call_later(tick, self._on_tick)

    def _write_status(self) -> None:
        self.spool.write_status(
            {
                "connected": self.connected,
                "broker": self._describe_url(),
                "published": self.published,
                "last_publish_time": self.last_publish_time,
                "last_error": self.last_error,
                "last_error_time": self.last_error_time,
            }
        )

    def _describe_url(self) -> str:
        params = self._params[self._url_index]
        return f"{params.host}:{params.port}"


class Remover:
    """Deletes confirmed spool files on a thread of its own. An unlink can cost far more
    than a publish (file systems mounted with ``discard`` trim the freed blocks at once);
    off the I/O loop it overlaps with publishing instead of stalling it. A file confirmed
    but not yet deleted when the agent is killed is sent again: a duplicate with the same
    Message-ID, never a loss."""

    def __init__(self, on_drained: Callable[[], None]) -> None:
        self._paths: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._on_drained = on_drained
        self.backlog = 0  # files handed over and not yet deleted
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="spool-remover", daemon=True)
        self._thread.start()

    def remove(self, path: Path) -> None:
        with self._lock:
            self.backlog += 1
        self._paths.put(path)

    def _run(self) -> None:
        while (path := self._paths.get()) is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove forwarded %s: %s", path.name, exc.strerror)
            with self._lock:
                self.backlog -= 1
            if self._paths.empty():
                # Room in the window again: let the I/O loop publish more.
                self._on_drained()

    def close(self) -> None:
        self._paths.put(None)
        self._thread.join()


def _cause(error: BaseException) -> str:
    """What is at the bottom of a failed connect as pika reports it: the cause sits under
    two or three wrappers whose own text is empty or a repr of the next one."""
    cause = error
    for _ in range(8):
        inner = getattr(cause, "exceptions", None)  # the workflow's attempts, last last
        phase = getattr(cause, "exception", None)  # what failed in one phase of one
        if inner:
            cause = inner[-1]
        elif isinstance(phase, BaseException):
            cause = phase
        elif cause.args and isinstance(cause.args[0], BaseException):
            cause = cause.args[0]
        else:
            break
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return describe(cause)
