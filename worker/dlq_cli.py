"""``clusteralert-worker dlq list|show|replay|purge``: the operator's view of the DLQ.
See :mod:`worker.dlq` for why browsing takes messages and how they are given back."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Final

from shared.config import BrokerConfig, load_config
from shared.event import canonical_uuid, visible

if TYPE_CHECKING:
    from worker.dlq import DeadMessage, DlqFilter, DlqSession

__all__ = ["add_dlq_parser", "run_dlq"]

_JSON_UNSAFE: Final = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _event_uuid(text: str) -> str:
    """An event id as the dead letters carry it: a UUID, in its canonical form."""
    try:
        return canonical_uuid(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an event UUID: {text[:40]!r}") from None


def add_dlq_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--config", help="config file")
    filters.add_argument("--reason", help="e.g. tls_refused, rejected_5xx, delivery_limit")
    filters.add_argument("--node")
    filters.add_argument("--module")
    filters.add_argument("--event", help="module:event_id, or an event id number")
    filters.add_argument("--since", help="a duration (30m, 2h, 1d) or an RFC 3339 time")
    filters.add_argument(
        "--id", action="append", default=[], type=_event_uuid, help="event UUID; repeatable"
    )
    filters.add_argument("--limit", type=int, help="act on at most this many messages")

    dlq = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered alerts")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser("list", parents=[filters], help="table of dead letters")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = actions.add_parser("show", help="one dead letter in full")
    show.add_argument("id", type=_event_uuid, help="event UUID")
    show.add_argument("--config", help="config file")
    replay = actions.add_parser(
        "replay", parents=[filters], help="re-publish to the work queue, then remove"
    )
    replay.add_argument("--dry-run", action="store_true", help="only list what would go")
    purge = actions.add_parser("purge", parents=[filters], help="delete dead letters")
    purge.add_argument("--dry-run", action="store_true", help="only list what would go")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _filter(args: argparse.Namespace) -> DlqFilter:
    from worker.dlq import DlqFilter, parse_since

    return DlqFilter(
        reason=args.reason,
        node=args.node,
        module=args.module,
        event=args.event,
        since=parse_since(args.since) if args.since else None,
        ids=frozenset(args.id),
    )


def _connect(config: BrokerConfig) -> Any:
    """The first broker that answers, with every wait bounded: ``connect_timeout`` covers
    the TCP and AMQP handshakes, and then every later read and write on the socket."""
    from worker.broker import connect_any

    # One attempt each: kombu would try twice, two seconds apart.
    return connect_any(config, retries=0, io_timeout=config.connect_timeout)[0]


@contextmanager
def _session(config_path: str | None) -> Iterator[DlqSession]:
    # Broker client imports wait until needed, so the parser stays cheap for other commands.
    from worker.dlq import DlqSession

    broker = load_config(config_path, sections=("broker",)).broker
    connection = _connect(broker)
    try:
        session = DlqSession(connection, broker.connect_timeout)
        yield session
        session.close()
    except BaseException:
        # Dropped, not closed politely: a broker that stopped answering would not answer
        # a close either. It requeues whatever was taken and not settled.
        connection.collect()
        raise
    # Everything is settled (the channel's close-ok says so): a failing close is harmless.
    with suppress(Exception):
        connection.release()


def _matching(session: DlqSession, args: argparse.Namespace) -> Iterator[DeadMessage]:
    """Matches up to ``--limit``. Walks the whole DLQ even past the limit, which keeps
    its order; callers must exhaust it."""
    wanted = _filter(args)
    found = 0
    for message in session.take():
        if (args.limit is None or found < args.limit) and wanted.matches(message):
            found += 1
            yield message


def _table(rows: list[dict[str, object]]) -> str:
    columns = ["id", "time", "node", "event", "reason", "attempts", "last_error"]
    cells = [[visible(str(row[c])) for c in columns] for row in rows]
    cells = [[c[:19] if i == 1 else c for i, c in enumerate(r)] for r in cells]
    cells = [[*r[:-1], r[-1][:60]] for r in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _json(doc: object) -> str:
    """JSON safe for a terminal: ``json`` escapes C0 controls itself; DEL, C1, the
    Unicode line separators and lone surrogates are escaped here (still valid JSON)."""
    text = json.dumps(doc, indent=2, ensure_ascii=False, default=_json_value)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _line(message: DeadMessage) -> str:
    return f"{visible(message.id)}  {visible(message.key)}  {visible(message.reason)}"


def _list(args: argparse.Namespace) -> int:
    with _session(args.config) as session:
        rows = [m.summary() for m in _matching(session, args)]
    if args.json:
        print(_json(rows))
    else:
        print(_table(rows))
        print(f"{len(rows)} dead letter(s)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    doc: dict[str, object] | None = None
    with _session(args.config) as session:
        for message in session.take():
            if doc is None and (message.id == args.id or args.id in message.events):
                body = message.raw.body
                try:
                    shown: object = json.loads(body)
                except ValueError:
                    shown = _json_value(body)
                doc = {**message.summary(), "headers": message.headers, "event": shown}
                if message.events:
                    doc["event_ids"] = list(message.events)
    if doc is None:
        print(f"clusteralert-worker: no dead letter with id {visible(args.id)}", file=sys.stderr)
        return 1
    print(_json(doc))
    return 0


class _Progress:
    """A progress line on stderr for large replays, at most a few times a second, and
    only on a terminal with nothing else printing to it: a dry run prints a line per
    dead letter, which the carriage returns would run into, and a log file or a pipe
    would keep every one of them."""

    def __init__(self, verb: str, *, live: bool):
        self.verb = verb
        self.done = 0
        self._last = 0.0
        self._live = live

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self._live and now - self._last >= 0.5:
            self._last = now
            print(f"\r{self.verb} {self.done}...", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        back = "\r" if self._live else ""  # over the progress line, where there is one
        print(f"{back}{self.verb} {self.done} dead letter(s)", file=sys.stderr)


def _replay(args: argparse.Namespace) -> int:
    progress = _Progress(
        "would replay" if args.dry_run else "replayed",
        live=not args.dry_run and sys.stderr.isatty(),
    )
    with _session(args.config) as session:
        for message in _matching(session, args):
            if args.dry_run:
                print(_line(message))
            else:
                session.replay(message)
            progress.step()
    progress.finish()
    return 0


def _purge(args: argparse.Namespace) -> int:
    """With ``--yes`` (or ``--dry-run``), one pass that purges (or lists) as it goes.
    Otherwise a pass that lists and remembers a digest per match, no connection while
    the operator decides, and a second pass that purges exactly those still there."""
    immediate = args.yes and not args.dry_run
    chosen: Counter[bytes] = Counter()
    with _session(args.config) as session:
        for message in _matching(session, args):
            print(_line(message), flush=True)
            if immediate:
                session.purge(message)
            chosen[message.digest] += 1
    count = chosen.total()
    if immediate:
        print(f"purged {count} dead letter(s)", file=sys.stderr)
        return 0
    if args.dry_run or not count:
        print(f"would purge {count} dead letter(s)", file=sys.stderr)
        return 0
    try:
        answer = input(f"Purge {count} dead letter(s)? This cannot be undone [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        print("nothing purged", file=sys.stderr)
        return 1
    wanted = _filter(args)
    purged = 0
    with _session(args.config) as session:
        for message in session.take():
            if chosen[message.digest] > 0 and wanted.matches(message):
                chosen[message.digest] -= 1
                session.purge(message)
                purged += 1
    gone = f" ({count - purged} had left the DLQ meanwhile)" if purged < count else ""
    print(f"purged {purged} dead letter(s){gone}", file=sys.stderr)
    return 0


def run_dlq(args: argparse.Namespace) -> int:
    commands = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}
    return commands[args.dlq_command](args)
