"""The incident engine: events in, notifications and acks out (README, "Incidents").

Pure: no broker, no SMTP, no clock of its own. The caller (the incident stage, which owns
the broker side) feeds it with :meth:`IncidentEngine.offer` and :meth:`IncidentEngine.tick`,
passing the time, and carries out the actions they return:

* :class:`Publish`: publish the notification (with publisher confirms) to the mail
  queue, then ack ``handles``, and only once the confirm came: they are the events it
  covers. If the publish fails, the handles must be returned to the queue (nack with
  requeue), never acked.
* :class:`Ack`: ack the handle now; the event was folded or filtered and must be counted
  under ``reason``.

Everything else the engine holds stays unacked on the broker. If the active stage dies,
RabbitMQ delivers the held events to the next one, whose engine rebuilds the incidents
from them: duplicates are possible then, loss is not. Only the memory of mails already
sent (for folding and threading) is lost with the process.

What it does with an event, in order:

1. The filter decision. A kind that ``resolves`` others and finds an open incident of
   equal identity ends it, even if its own mail flag is off (its recovery is a reply to
   a mail the operator has); otherwise an event that is not mailed is acked at once.
2. The incident key: cluster, ``module:event_id`` and the identity values. The first
   event of a key is held ``group_wait`` seconds; events of the same key meanwhile join
   it (any reporter). Then one notification covers them all.
3. Reports of a mailed key within ``repeat_interval`` of its mail are folded (acked,
   counted); later, the next one is mailed again as a repeat that says how often the key
   was seen since.
4. Per storm group, once ``storm_threshold`` notifications went out within the last
   ``storm_window`` seconds, further notifications are held and go out as one digest at
   the end of the window, and so on, one digest per window, while the rate stays that
   high (digested notifications count as sent).
5. At most ``max_held`` events are held: past it, the oldest held window goes out early.

``group_wait = 0`` turns grouping off: every event is its own notification at once, and
nothing is folded, as before incidents existed.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeVar

from shared.catalog import Catalog, CatalogEntry
from shared.config import FilterConfig, IncidentConfig
from shared.event import Event, clean_text, encode_event
from shared.filter import Decision, FilterReason, decide
from shared.notification import DIGEST_PREFIX, MAX_IDS, MAX_REPORTERS, Item, Kind, Notification
from shared.placeholders import placeholders

if TYPE_CHECKING:
    from worker.metrics import Metrics

__all__ = ["Ack", "AckReason", "Action", "IncidentEngine", "Publish", "count"]

H = TypeVar("H")
AckReason = Literal["duplicate", "repeat"] | FilterReason
# A digest goes out early rather than grow past these: the mail must stay well under a
# relay's size limit, and the notification under the queue's.
MAX_DIGEST_ITEMS: Final = 1000
MAX_DIGEST_BYTES: Final = 3 * 1024 * 1024
DIGEST_VALUE_BYTES: Final = 512

IncidentKey = tuple[str, str, tuple[tuple[str, str | None], ...]]
StormGroup = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Publish(Generic[H]):
    """Publish ``notification`` with a confirm, then ack ``handles``."""

    notification: Notification
    handles: tuple[H, ...]

    @property
    def opened(self) -> int:
        """New incidents it reports (for ``clusteralert_incidents_opened_total``)."""
        if self.notification.kind in ("incident", "digest"):
            return sum(1 for i in self.notification.items if i.replies_to is None)
        return 0

    @property
    def folded(self) -> int:
        """Reports merged into another one of the same incident (``reason=duplicate``)."""
        folded = 0
        for item in self.notification.items:
            folded += item.reports - 1
            if item.resolved is not None:
                folded += item.resolved.reports - 1
        return folded

    @property
    def recoveries(self) -> int:
        return sum(
            1
            for i in self.notification.items
            if i.resolved is not None or (i.duration is not None and i.replies_to is not None)
        )


@dataclass(frozen=True, slots=True)
class Ack(Generic[H]):
    """Ack ``handle`` now and count it: folded (duplicate, repeat) or filtered."""

    handle: H
    reason: AckReason


Action = Publish[H] | Ack[H]


@dataclass(slots=True)
class _Reports(Generic[H]):
    """The reports of one incident (or of its end) collected so far."""

    first: Event
    ids: list[str]
    reporters: dict[str, int]
    handles: list[H]
    seen: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, event: Event, handle: H) -> _Reports[H]:
        return cls(event, [event.id], {event.reported_by: 1}, [handle], {event.id})

    def add(self, event: Event, handle: H) -> None:
        self.handles.append(handle)
        if len(self.ids) < MAX_IDS and event.id not in self.seen:
            self.ids.append(event.id)
            self.seen.add(event.id)
        reporter = event.reported_by
        if reporter in self.reporters or len(self.reporters) < MAX_REPORTERS:
            self.reporters[reporter] = self.reporters.get(reporter, 0) + 1

    def item(self, **extra: object) -> Item:
        return Item(
            event=self.first,
            ids=tuple(self.ids),
            reporters=tuple(self.reporters.items()),
            reports=len(self.handles),
            **extra,  # type: ignore[arg-type]
        )


@dataclass(slots=True, eq=False)
class _Pending(Generic[H]):
    """A notification being prepared: in its group_wait, or held in a digest."""

    kind: Kind
    key: IncidentKey
    group: StormGroup
    reports: _Reports[H]
    deadline: float
    size: int  # bytes it adds to a digest
    replies_to: str | None = None
    since: int = 0
    started: datetime | None = None  # recovery: when the incident it ends began
    resolved: _Reports[H] | None = None
    done: bool = False  # its group_wait is over
    in_digest: bool = False  # held for its storm group's digest (still joinable)
    ended_quietly: bool = False  # a silenced recovery ended it (see end_quietly)

    @property
    def handles(self) -> list[H]:
        extra = self.resolved.handles if self.resolved is not None else []
        return self.reports.handles + extra

    def item(self) -> Item:
        resolved = None
        duration = None
        if self.resolved is not None:
            resolved = self.resolved.item()
            duration = _seconds(self.reports.first.time, self.resolved.first.time)
        elif self.kind == "recovery" and self.started is not None:
            duration = _seconds(self.started, self.reports.first.time)
        return self.reports.item(
            since=self.since, replies_to=self.replies_to, duration=duration, resolved=resolved
        )


@dataclass(slots=True, eq=False)
class _Digest(Generic[H]):
    group: StormGroup
    deadline: float
    pendings: list[_Pending[H]] = field(default_factory=list)
    size: int = 0
    done: bool = False


@dataclass(slots=True)
class _Mailed:
    """What is remembered of an incident after its mail: for folding and threading."""

    token: str  # the local part of its mail's Message-ID
    began: datetime  # its first report's event time
    touched: float  # when it was last mailed (or ended): repeats count from here
    seen: float  # when it was last reported: forgotten a repeat_interval after that
    since: int = 0  # reports folded since
    ended: bool = False


def _seconds(start: datetime, end: datetime) -> float:
    # Event times come from different nodes' clocks: never a negative duration.
    return max(0.0, (end - start).total_seconds())


def _brief(event: Event, entry: CatalogEntry | None) -> Event:
    """What a digest line needs of an event: the params its catalog text names, each cut
    to DIGEST_VALUE_BYTES, and its own text cut likewise. A digest of a thousand events
    with 64 params of 4 KiB each stays one mail this way."""
    wanted = set(placeholders(entry.text)) if entry is not None else set()
    params = {k: clean_text(v, DIGEST_VALUE_BYTES) for k, v in event.params.items() if k in wanted}
    text = None if event.text is None else clean_text(event.text, 2 * DIGEST_VALUE_BYTES)
    if params == event.params and text == event.text:
        return event
    return replace(event, params=params, text=text)


def _size(event: Event) -> int:
    """What a (shortened) event adds to a digest's notification, in bytes."""
    return len(encode_event(event)) + 200


class IncidentEngine(Generic[H]):
    def __init__(
        self,
        config: IncidentConfig,
        catalog: Catalog,
        filters: FilterConfig,
        *,
        decider: Callable[[Event, Catalog, FilterConfig], Decision] = decide,
    ):
        self.config = config
        self.catalog = catalog
        self.filters = filters
        self.decide = decider
        self.held = 0  # events held unacked (for clusteralert_incident_held)
        self._pending: dict[IncidentKey, _Pending[H]] = {}
        self._recovering: dict[IncidentKey, _Pending[H]] = {}
        self._mailed: OrderedDict[IncidentKey, _Mailed] = OrderedDict()
        # Mailed incidents that stopped recurring but that a kind in the catalog can end:
        # kept (at most max_held, oldest dropped first) so that an all-clear hours later
        # still answers its failure's mail.
        self._awaiting: OrderedDict[IncidentKey, _Mailed] = OrderedDict()
        self._resolvable = {target for key in catalog for target in catalog[key].resolves}
        self._digests: dict[StormGroup, _Digest[H]] = {}
        self._sent: dict[StormGroup, deque[float]] = {}
        self._last_digest: dict[StormGroup, float] = {}
        self._heap: list[tuple[float, int, _Pending[H] | _Digest[H]]] = []
        self._seq = itertools.count()
        self._next_sweep = 0.0

    # -- the interface ------------------------------------------------------------------

    def offer(self, event: Event, handle: H, now: float) -> list[Action[H]]:
        """Take one decoded event; ``handle`` is what the caller acks it with."""
        actions: list[Action[H]] = []
        decision = self.decide(event, self.catalog, self.filters)
        entry = decision.entry
        if entry is not None and entry.resolves and decision.reason != "disabled":
            taken = self._resolve(event, handle, entry, now, actions)
            if isinstance(taken, Ack):
                return [taken]
            if taken:
                self._bound(now, actions)
                return actions
        if not decision.mail:
            assert decision.reason is not None
            return [Ack(handle, decision.reason)]
        key = self._key(event, entry)
        if self.config.group_wait <= 0:
            self._open("incident", key, event, handle, now=now, actions=actions)
            self._bound(now, actions)  # a storm may hold it, and max_held still holds
            return actions
        pending = self._pending.get(key)
        if pending is not None:
            pending.reports.add(event, handle)
            pending.size += 40
            self.held += 1
            self._bound(now, actions)
            return actions
        mailed = self._mailed.get(key)
        if mailed is not None and not mailed.ended:
            if now - mailed.touched < self.config.repeat_interval:
                mailed.since += 1
                mailed.seen = now
                self._mailed.move_to_end(key)
                return [Ack(handle, "repeat")]
            self._open("repeat", key, event, handle, now=now, actions=actions, mailed=mailed)
        else:
            self._open("incident", key, event, handle, now=now, actions=actions)
        self._bound(now, actions)
        return actions

    def tick(self, now: float) -> list[Action[H]]:
        """Send what is due at ``now``."""
        actions: list[Action[H]] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, _, due = heapq.heappop(self._heap)
            if due.done or due.deadline != deadline:
                continue
            if isinstance(due, _Digest):
                self._send_digest(due, now, actions)
            else:
                self._release(due, now, actions)
        self._forget(now)
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do, or None."""
        while self._heap:
            deadline, _, due = self._heap[0]
            if not due.done and due.deadline == deadline:
                return deadline
            heapq.heappop(self._heap)
        return None

    def flush(self, now: float) -> list[Action[H]]:
        """Send everything held now (tests, benchmarks; a stopping stage does not need
        it: what it holds is unacked and goes to the next active stage)."""
        actions: list[Action[H]] = []
        for pending in sorted(
            [*self._pending.values(), *self._recovering.values()], key=lambda p: p.deadline
        ):
            if not pending.in_digest:
                self._release(pending, now, actions)
        for digest in list(self._digests.values()):
            self._send_digest(digest, now, actions)
        return actions

    # -- keys ---------------------------------------------------------------------------

    @staticmethod
    def _identity(
        event: Event, names: tuple[str, ...] | None
    ) -> tuple[tuple[str, str | None], ...]:
        params = event.params
        if names is None:
            # Every param, and the node the event is about: reports about different nodes
            # are different incidents unless the catalog says otherwise.
            return (("\0node", event.node), *sorted(params.items()))
        return tuple(
            (name, params.get(name, event.node if name == "node" else None)) for name in names
        )

    def _key(self, event: Event, entry: CatalogEntry | None) -> IncidentKey:
        names = entry.identity if entry is not None else None
        return (event.cluster, event.key, self._identity(event, names))

    def _group(self, event: Event) -> StormGroup:
        fields = {
            "cluster": event.cluster,
            "node": event.node,
            "module": event.module,
            "key": event.key,
        }
        return tuple(fields[name] for name in self.config.storm_by)

    # -- recovery -----------------------------------------------------------------------

    def _resolve(
        self, event: Event, handle: H, entry: CatalogEntry, now: float, actions: list[Action[H]]
    ) -> Ack[H] | bool:
        """End an open incident that ``event`` resolves: True when the event was taken
        for that, an ack when it only repeats an end already reported, else False."""
        for key in self._resolved_keys(event, entry):
            pending = self._pending.get(key)
            if pending is not None:
                # Not mailed yet: one mail reports both.
                if pending.resolved is None:
                    pending.resolved = _Reports.start(event, handle)
                else:
                    pending.resolved.add(event, handle)
                pending.size += _size(event)
                self.held += 1
                if pending.in_digest:
                    digest = self._digests[pending.group]
                    digest.size += _size(_brief(event, entry))
                    self._check_digest_size(digest, now, actions)
                return True
            recovering = self._recovering.get(key)
            if recovering is not None:
                recovering.reports.add(event, handle)
                self.held += 1
                return True
            mailed = self._mailed.get(key)
            if mailed is None:
                mailed = self._awaiting.pop(key, None)
                if mailed is None:
                    continue
                self._mailed[key] = mailed
            if mailed.ended:
                recent = now - mailed.touched < self.config.repeat_interval
                if recent and self.config.group_wait > 0:
                    return Ack(handle, "duplicate")  # another node's report of the end
                continue
            mailed.ended = True
            mailed.touched = mailed.seen = now
            self._mailed.move_to_end(key)
            self._open("recovery", key, event, handle, now=now, actions=actions, mailed=mailed)
            return True
        return False

    def end_quietly(self, event: Event, entry: CatalogEntry, now: float) -> None:
        """A recovery that a silence held back (the caller acks it): end the incidents it
        would have ended, without a mail. Otherwise they stay open, and the next failure
        of a key within ``repeat_interval`` would be folded as a repeat, not mailed."""
        for key in self._resolved_keys(event, entry):
            pending = self._pending.get(key)
            if pending is not None:
                pending.ended_quietly = True  # its failure mail still goes out
                continue
            mailed = self._mailed.get(key)
            if mailed is not None:
                mailed.ended = True
                mailed.touched = mailed.seen = now
            self._awaiting.pop(key, None)  # nothing left for a recovery to end

    def _resolved_keys(self, event: Event, entry: CatalogEntry) -> list[IncidentKey]:
        """The keys of the incidents that ``event`` (of a kind that resolves) ends."""
        keys = []
        for target in entry.resolves:
            module, _, number = target.partition(":")
            failure = self.catalog.lookup(module, int(number))
            names = failure.identity if failure is not None else None
            keys.append((event.cluster, target, self._identity(event, names)))
        return keys

    # -- holding and sending -------------------------------------------------------------

    def _open(
        self,
        kind: Kind,
        key: IncidentKey,
        event: Event,
        handle: H,
        *,
        now: float,
        actions: list[Action[H]],
        mailed: _Mailed | None = None,
    ) -> None:
        pending: _Pending[H] = _Pending(
            kind=kind,
            key=key,
            group=self._group(event),
            reports=_Reports.start(event, handle),
            deadline=now + self.config.group_wait,
            size=0,  # counted once it goes into a digest (see _shorten)
        )
        if mailed is not None:
            pending.replies_to = mailed.token
            pending.started = mailed.began
            if kind == "repeat":
                pending.since = mailed.since
        self.held += 1
        if self.config.group_wait <= 0:
            self._release(pending, now, actions)
            return
        (self._recovering if kind == "recovery" else self._pending)[key] = pending
        heapq.heappush(self._heap, (pending.deadline, next(self._seq), pending))

    def _storming(self, group: StormGroup, now: float) -> bool:
        """Whether ``storm_threshold`` notifications of the group went out, or would
        have but were digested, within the last ``storm_window``; or a digest is open."""
        threshold = self.config.storm_threshold
        if threshold <= 0:
            return False
        if group in self._digests:
            return True
        sent = self._sent.get(group)
        return (
            sent is not None and len(sent) >= threshold and sent[0] > now - self.config.storm_window
        )

    def _count_sent(self, group: StormGroup, now: float) -> None:
        threshold = self.config.storm_threshold
        if threshold > 0:
            self._sent.setdefault(group, deque(maxlen=threshold)).append(now)

    def _release(self, pending: _Pending[H], now: float, actions: list[Action[H]]) -> None:
        """The pending's group_wait is over: send it, or hold it for its group's digest."""
        pending.done = True
        if self._storming(pending.group, now):
            digest = self._digests.get(pending.group)
            if digest is None:
                last = self._last_digest.get(pending.group)
                window = self.config.storm_window
                start = last if last is not None and last > now - window else now
                digest = _Digest(pending.group, start + window)
                self._digests[pending.group] = digest
                heapq.heappush(self._heap, (digest.deadline, next(self._seq), digest))
            # Still listed: later reports and its end join it until the digest goes out.
            # Counted as if sent: the storm lasts as long as the rate stays high.
            pending.in_digest = True
            self._count_sent(pending.group, now)
            digest.pendings.append(pending)
            self._shorten(pending)
            digest.size += pending.size
            self._check_digest_size(digest, now, actions)
            return
        self._unlist(pending)
        item = pending.item()
        self._remember(pending, item.event.id, now)
        handles = tuple(pending.handles)
        self.held -= len(handles)
        self._count_sent(pending.group, now)
        actions.append(Publish(Notification(pending.kind, (item,)), handles))

    def _shorten(self, pending: _Pending[H]) -> None:
        """Keep of a digested incident's reports only what its digest line shows."""
        for reports in (pending.reports, pending.resolved):
            if reports is not None:
                first = reports.first
                reports.first = _brief(first, self.catalog.lookup(first.module, first.event_id))
        pending.size = 40 * len(pending.handles) + sum(
            _size(r.first) for r in (pending.reports, pending.resolved) if r is not None
        )

    def _check_digest_size(self, digest: _Digest[H], now: float, actions: list[Action[H]]) -> None:
        if len(digest.pendings) >= MAX_DIGEST_ITEMS or digest.size >= MAX_DIGEST_BYTES:
            self._send_digest(digest, now, actions)

    def _unlist(self, pending: _Pending[H]) -> None:
        table = self._recovering if pending.kind == "recovery" else self._pending
        if table.get(pending.key) is pending:
            del table[pending.key]

    def _remember(self, pending: _Pending[H], token: str, now: float) -> None:
        """Keep what folding and threading need of a mailed incident."""
        if pending.kind == "recovery":
            return  # its incident is remembered already, as ended
        previous = self._mailed.get(pending.key)
        if pending.kind == "repeat" and previous is not None:
            # Replies keep answering the first mail of the incident.
            previous.touched, previous.seen, previous.since = now, now, 0
            previous.ended = pending.resolved is not None or pending.ended_quietly
            self._mailed.move_to_end(pending.key)
            return
        began = pending.reports.first.time
        ended = pending.resolved is not None or pending.ended_quietly
        self._awaiting.pop(pending.key, None)  # a new incident of the key replaces it
        self._mailed[pending.key] = _Mailed(token, began, now, now, ended=ended)
        self._mailed.move_to_end(pending.key)

    def _send_digest(self, digest: _Digest[H], now: float, actions: list[Action[H]]) -> None:
        digest.done = True
        if self._digests.get(digest.group) is digest:
            del self._digests[digest.group]
        if not digest.pendings:
            return
        for pending in digest.pendings:
            self._shorten(pending)  # what joined it meanwhile too
        items = tuple(p.item() for p in digest.pendings)
        token = f"{DIGEST_PREFIX}{items[0].event.id}"
        handles: list[H] = []
        for pending in digest.pendings:
            self._unlist(pending)
            self._remember(pending, token, now)
            handles += pending.handles
        self.held -= len(handles)
        self._last_digest[digest.group] = now
        notification = Notification("digest", items, window=self.config.storm_window)
        actions.append(Publish(notification, tuple(handles)))

    # -- bounds -------------------------------------------------------------------------

    def _bound(self, now: float, actions: list[Action[H]]) -> None:
        """Past ``max_held``, send the oldest held window early: the oldest digest, else
        the incident longest in its group_wait."""
        while self.held > self.config.max_held:
            if self._digests:
                oldest = min(self._digests.values(), key=lambda d: d.deadline)
                self._send_digest(oldest, now, actions)
                continue
            deadline = self.next_deadline()
            if deadline is None:
                return
            due = self._heap[0][2]
            heapq.heappop(self._heap)
            assert isinstance(due, _Pending)
            self._release(due, now, actions)

    def _forget(self, now: float) -> None:
        """Drop what folding and storms no longer need: mailed incidents not reported for
        ``repeat_interval`` (and the oldest past ``max_held`` of them), storm counts of
        quiet groups. A key still recurring is kept, so its next report is a repeat; one
        that a recovery can still end waits for it in ``_awaiting``."""
        horizon = now - self.config.repeat_interval
        mailed = self._mailed
        while mailed and (
            next(iter(mailed.values())).seen <= horizon or len(mailed) > self.config.max_held
        ):
            key, record = mailed.popitem(last=False)
            if not record.ended and key[1] in self._resolvable:
                self._awaiting[key] = record
                if len(self._awaiting) > self.config.max_held:
                    self._awaiting.popitem(last=False)
        if now < self._next_sweep:
            return
        window = self.config.storm_window
        self._next_sweep = now + window
        for group in [g for g, sent in self._sent.items() if sent[-1] <= now - window]:
            del self._sent[group]
        for group in [g for g, at in self._last_digest.items() if at <= now - window]:
            del self._last_digest[group]


def count(metrics: Metrics, done: Action[H]) -> None:
    """Count an action once it is carried out: an :class:`Ack` once acked, a
    :class:`Publish` once its confirm came (not before: unconfirmed, it did not happen)."""
    if isinstance(done, Ack):
        if done.reason in ("duplicate", "repeat"):
            metrics.folded.labels(done.reason).inc()
        else:
            metrics.filtered.labels(done.reason).inc()
        return
    metrics.incidents_opened.inc(done.opened)
    metrics.folded.labels("duplicate").inc(done.folded)
    metrics.recoveries.inc(done.recoveries)
    if done.notification.kind == "digest":
        metrics.digests.inc()
