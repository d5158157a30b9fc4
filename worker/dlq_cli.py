"""``clusteralert-worker dlq list|show|replay|purge``: the operator's view of the DLQ.
See :mod:`worker.dlq` for why browsing takes messages and how they are given back."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from shared.config import load_config
from shared.errors import ClusteralertError

if TYPE_CHECKING:
    from worker.dlq import DeadMessage, DlqFilter, DlqSession

__all__ = ["add_dlq_parser", "run_dlq"]


def add_dlq_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--config", help="config file")
    filters.add_argument("--reason", help="e.g. tls_refused, rejected_5xx, delivery_limit")
    filters.add_argument("--node")
    filters.add_argument("--module")
    filters.add_argument("--event", help="module:event_id, or an event id number")
    filters.add_argument("--since", help="a duration (30m, 2h, 1d) or an RFC 3339 time")
    filters.add_argument("--id", action="append", default=[], help="event UUID; repeatable")
    filters.add_argument("--limit", type=int, help="act on at most this many messages")

    dlq = sub.add_parser("dlq", help="inspect, replay or purge dead-lettered alerts")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    listing = actions.add_parser("list", parents=[filters], help="table of dead letters")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = actions.add_parser("show", help="one dead letter in full")
    show.add_argument("id", help="event UUID")
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


@contextmanager
def _session(config_path: str | None) -> Iterator[DlqSession]:
    # Broker client imports wait until needed, so the parser stays cheap for other commands.
    from worker.consume import connect_any
    from worker.dlq import DlqSession

    config = load_config(config_path, sections=("broker",))
    try:
        connection, _ = connect_any(config.broker)
    except Exception as exc:
        raise ClusteralertError(f"cannot reach the broker: {exc}") from None
    session = DlqSession(connection)
    try:
        yield session
    finally:
        # Gives back everything taken and not replayed or purged.
        session.close()
        connection.release()


def _matching(session: DlqSession, args: argparse.Namespace) -> Iterator[DeadMessage]:
    wanted = _filter(args)
    found = 0
    for message in session.take():
        if args.limit is not None and found >= args.limit:
            return
        if wanted.matches(message):
            found += 1
            yield message


def _table(rows: list[dict[str, object]]) -> str:
    columns = ["id", "time", "node", "event", "reason", "attempts", "last_error"]
    cells = [[str(row[c]) for c in columns] for row in rows]
    cells = [[c[:19] if i == 1 else c for i, c in enumerate(r)] for r in cells]
    cells = [[*r[:-1], r[-1][:60]] for r in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _list(args: argparse.Namespace) -> int:
    with _session(args.config) as session:
        rows = [m.summary() for m in _matching(session, args)]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(_table(rows))
        print(f"{len(rows)} dead letter(s)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    with _session(args.config) as session:
        for message in session.take():
            if message.id == args.id:
                body = message.raw.body
                try:
                    shown: object = json.loads(body)
                except ValueError:
                    shown = (
                        body.decode("utf-8", errors="replace")
                        if isinstance(body, bytes)
                        else str(body)
                    )
                doc = {**message.summary(), "headers": _plain(message.headers), "event": shown}
                print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
                return 0
    print(f"clusteralert-worker: no dead letter with id {args.id}", file=sys.stderr)
    return 1


def _plain(headers: dict[str, object]) -> dict[str, object]:
    return {
        k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in headers.items()
    }


class _Progress:
    """A progress line on stderr for large replays, at most a few times a second."""

    def __init__(self, verb: str):
        self.verb = verb
        self.done = 0
        self._last = 0.0

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            print(f"\r{self.verb} {self.done}...", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(f"\r{self.verb} {self.done} dead letter(s)", file=sys.stderr)


def _replay(args: argparse.Namespace) -> int:
    progress = _Progress("would replay" if args.dry_run else "replayed")
    with _session(args.config) as session:
        for message in _matching(session, args):
            if args.dry_run:
                print(f"{message.id}  {message.key}  {message.reason}")
            else:
                session.replay(message)
            progress.step()
    progress.finish()
    return 0


def _purge(args: argparse.Namespace) -> int:
    with _session(args.config) as session:
        doomed = list(_matching(session, args))
        for message in doomed:
            print(f"{message.id}  {message.key}  {message.reason}")
        if args.dry_run or not doomed:
            print(f"would purge {len(doomed)} dead letter(s)", file=sys.stderr)
            return 0
        if not args.yes:
            try:
                answer = input(f"Purge {len(doomed)} dead letter(s)? This cannot be undone [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing purged", file=sys.stderr)
                return 1
        for message in doomed:
            session.purge(message)
    print(f"purged {len(doomed)} dead letter(s)", file=sys.stderr)
    return 0


def run_dlq(args: argparse.Namespace) -> int:
    commands = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}
    return commands[args.dlq_command](args)
