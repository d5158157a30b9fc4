"""``clusteralert-worker silence add|list|expire``: maintenance windows (README,
"Silences"). Each command reads the silences stream to its end (see
:mod:`worker.silence_follow`); ``add`` and ``expire`` then append one confirmed record.
Bad input is refused with one line and exit status 2, before anything is written."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from shared.cli import key_values
from shared.config import load_config
from shared.event import visible
from shared.silence import (
    InvalidSilence,
    Record,
    SilenceBook,
    format_time,
    new_silence,
    parse_duration,
    parse_until,
)

if TYPE_CHECKING:
    from worker.broker import Broker

__all__ = ["READ_IDLE", "add_silence_parser", "run_silence", "stalled"]

PROG: Final = "clusteralert-worker"
BAD_INPUT: Final = 2
# Reading gives up only after this long without a record: a long stream (a silence that
# held back a storm for weeks writes a record a second) takes longer than any fixed
# limit, at about 20,000 records a second.
READ_IDLE: Final = 30.0


def add_silence_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    silence = sub.add_parser("silence", help="silence kinds of event for a while (maintenance)")
    actions = silence.add_subparsers(dest="silence_command", required=True)
    add = actions.add_parser("add", help="add a silence; prints its id")
    add.add_argument(
        "match", nargs="*", metavar="MATCH", help="module:event_id pattern, e.g. monitor:*"
    )
    add.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 90m, 2h, 1d")
    add.add_argument("--until", metavar="TIME", help="an RFC 3339 time, e.g. 2026-11-27T22:00:00Z")
    add.add_argument("--comment", default="", help="why (required)")
    add.add_argument("--cluster", help="only events of this cluster")
    add.add_argument("--node", help="only events about this node")
    add.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only events with this param",
    )
    add.add_argument("--author", help="who (default: the login user)")
    add.add_argument("--config", help="config file")
    listing = actions.add_parser("list", help="active silences (--all: every one kept)")
    listing.add_argument("--all", action="store_true", help="also ended silences")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.add_argument("--config", help="config file")
    expire = actions.add_parser("expire", help="end a silence now")
    expire.add_argument("id", help="the silence id")
    expire.add_argument("--author", help="who (default: the login user)")
    expire.add_argument("--config", help="config file")


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _connect(config_path: str | None) -> Broker:
    from worker.broker import Broker

    broker = Broker(load_config(config_path, sections=("broker",)).broker)
    broker.connect()
    return broker


def _read(broker: Broker) -> SilenceBook:
    from worker.silence_follow import SilenceFollower

    follower = SilenceFollower(broker)
    return follower.read_all(lambda: broker.drain(0.2), stalled(lambda: follower.records_read))


def stalled(
    progress: Callable[[], int],
    idle: float = READ_IDLE,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], bool]:
    """A deadline that moves with ``progress``: True once it has not changed for
    ``idle`` seconds."""
    seen, since = progress(), clock()

    def check() -> bool:
        nonlocal seen, since
        now, current = clock(), progress()
        if current != seen:
            seen, since = current, now
        return now - since > idle

    return check


def _add(args: argparse.Namespace) -> int:
    from worker.silence_follow import publish_record

    now = datetime.now(UTC)
    silence = new_silence(
        args.match,
        now=now,
        duration=parse_duration(args.duration) if args.duration is not None else None,
        until=parse_until(args.until) if args.until is not None else None,
        comment=args.comment,
        author=args.author or _login(),
        cluster=args.cluster,
        node=args.node,
        params=key_values(args.param, InvalidSilence),
    )
    broker = _connect(args.config)
    try:
        publish_record(broker, Record("add", silence.id, silence=silence))
    finally:
        broker.close()
    print(silence.id)
    return 0


def _expire(args: argparse.Namespace) -> int:
    from worker.silence_follow import publish_record

    broker = _connect(args.config)
    try:
        book = _read(broker)
        if args.id not in book:
            raise InvalidSilence(f"no silence {args.id!r:.60} (see 'silence list --all')")
        now = datetime.now(UTC)
        end = book.end(args.id)
        if end <= now:
            raise InvalidSilence(f"silence {args.id} already ended at {format_time(end)}")
        publish_record(broker, Record("expire", args.id, at=now, author=args.author or _login()))
    finally:
        broker.close()
    print(f"expired {args.id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    broker = _connect(args.config)
    try:
        book = _read(broker)
    finally:
        broker.close()
    shown = book.listing(datetime.now(UTC), everything=args.all)
    if args.json:
        for entry in shown:
            entry["held_rows"] = [
                {
                    "cluster": r.cluster,
                    "key": r.key,
                    "node": r.node,
                    "count": r.count,
                    "first": format_time(r.first),
                    "last": format_time(r.last),
                }
                for r in book.held(str(entry["id"]))
            ]
        # Non-ASCII escaped: the records are anyone's with write access to the stream.
        print(json.dumps(shown, indent=2))
        return 0
    print(f"{'ID':36}  {'START':20}  {'END':20}  {'HELD':>6}  AUTHOR  MATCHERS  COMMENT")
    for entry in shown:
        silence = book.silence(str(entry["id"]))
        start, end = (_to_second(silence.start), _to_second(book.end(silence.id)))
        print(
            f"{entry['id']!s:36}  {start:20}  {end:20}  "
            f"{entry['held']!s:>6}  {visible(silence.author)}  {visible(silence.describe())}  "
            f"{visible(silence.comment)}"
        )
    return 0


def _to_second(value: datetime) -> str:
    """To the second, for the table (JSON keeps the full time)."""
    return format_time(value.replace(microsecond=0))


def run_silence(args: argparse.Namespace) -> int:
    commands = {"add": _add, "list": _list, "expire": _expire}
    try:
        return commands[args.silence_command](args)
    except InvalidSilence as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return BAD_INPUT
