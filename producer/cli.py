"""``clusteralert-producer``: the node-side command.

``emit`` runs once per cluster event, often from a hook with a timeout, so it imports only
what spooling needs; pika is loaded by ``run`` alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.cli import Version, key_values, on_stop_signal, report_errors
from shared.config import Config, load_config
from shared.errors import InvalidEvent, SpoolError
from shared.event import new_event
from shared.own_events import worker_only

if TYPE_CHECKING:
    from producer.spool import Spool

__all__ = ["main", "pacemaker_main"]

PROG = "clusteralert-producer"
# The group Pacemaker's agent user (hacluster) is in; the spool must be writable by it.
AGENT_GROUP = "haclient"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Spool and forward cluster events.")
    parser.add_argument("--version", action=Version)
    sub = parser.add_subparsers(dest="command", required=True)

    emit = sub.add_parser("emit", help="spool one event durably and print its id")
    emit.add_argument("--module", required=True, help="event module, [a-z0-9_-]{1,32}")
    emit.add_argument("--event-id", required=True, type=int, help="event number, 0 or more")
    emit.add_argument("--level", choices=("info", "warning", "error"))
    emit.add_argument(
        "--node",
        help="the node the event is about (default: this node, [producer] node, else host "
        "name); the reporter is always this node",
    )
    emit.add_argument("--cluster", help="cluster name (default: [producer] cluster)")
    emit.add_argument(
        "--param",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="event parameter; may be repeated",
    )
    emit.add_argument("--text", help="free text for events without a catalog entry")
    emit.add_argument("--source", default="cli", help=argparse.SUPPRESS)
    emit.add_argument(
        "--config",
        help="config file (default: $CLUSTERALERT_CONFIG, "
        "then /etc/clusteralert/clusteralert.toml)",
    )

    run = sub.add_parser("run", help="forward the spool to RabbitMQ until stopped")
    run.add_argument("--config", help="config file")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--log-format", choices=("text", "json"), default="text")

    pacemaker = sub.add_parser(
        "pacemaker", help="Pacemaker alert agent: spool the alert in CRM_alert_* variables"
    )
    pacemaker.add_argument("--config", help="config file")

    keepalived = sub.add_parser("keepalived", help="keepalived notify script")
    keepalived.add_argument("type", metavar="GROUP|INSTANCE")
    keepalived.add_argument("name", metavar="NAME")
    keepalived.add_argument("state", metavar="STATE")
    keepalived.add_argument("priority", metavar="PRIORITY", nargs="?", default="")
    keepalived.add_argument("--config", help="config file")

    status = sub.add_parser("status", help="spool depth, oldest event, last publish error")
    status.add_argument("--config", help="config file")
    status.add_argument("--json", action="store_true")
    return parser


def _spool(config: Config) -> Spool:
    from producer.spool import Spool

    producer = config.producer
    return Spool(producer.spool_dir, max_events=producer.max_events, max_bytes=producer.max_bytes)


def _node(config: Config) -> str:
    # os.uname is cheaper than importing socket, and names the same host.
    node: str = config.producer.node or os.uname().nodename
    return node


def _emit(args: argparse.Namespace) -> int:
    config = load_config(args.config, sections=("producer",))
    event = new_event(
        module=args.module,
        event_id=args.event_id,
        level=args.level,
        cluster=args.cluster if args.cluster is not None else config.producer.cluster,
        node=args.node or _node(config),
        params=key_values(args.param),
        text=args.text,
        source=args.source,
        reporter=_node(config),
    )
    kind = worker_only(event)
    if kind is not None:
        raise InvalidEvent(
            f"{event.key} is the pipeline's {kind}, which only workers send; "
            "a node may not spool it"
        )
    _spool(config).write(event)
    print(event.id)
    return 0


def _pacemaker(args: argparse.Namespace) -> int:
    from producer.sources import pacemaker_event

    config = load_config(args.config, sections=("producer",))
    event = pacemaker_event(
        os.environ, cluster=config.producer.cluster, fallback_node=_node(config)
    )
    if event is not None:
        spool = _spool(config)
        try:
            # Each recipient's run spools the same id; only the first one counts.
            spool.write_once(event)
        except SpoolError as exc:
            raise SpoolError(f"{exc}{_agent_access_hint(spool.directory)}") from None
        print(event.id)
    return 0


def _agent_access_hint(directory: Path) -> str:
    """What to fix when Pacemaker's user cannot write the spool: Pacemaker logs the
    agent's stderr, so the one line there must say it."""
    if os.access(directory, os.W_OK | os.X_OK) or not directory.is_dir():
        return ""
    import grp
    import pwd

    info = directory.stat()
    try:
        owner = f"{pwd.getpwuid(info.st_uid).pw_name}:{grp.getgrgid(info.st_gid).gr_name}"
    except KeyError:
        owner = f"{info.st_uid}:{info.st_gid}"
    user = pwd.getpwuid(os.getuid()).pw_name
    return (
        f" (it is {owner} {info.st_mode & 0o7777:o}; this agent runs as {user}): give it "
        f"the group of Pacemaker's user, chgrp {AGENT_GROUP} {directory} && "
        f"chmod 2770 {directory}"
    )


def _keepalived(args: argparse.Namespace) -> int:
    from producer.sources import keepalived_event

    config = load_config(args.config, sections=("producer",))
    event = keepalived_event(
        [args.type, args.name, args.state, args.priority],
        cluster=config.producer.cluster,
        node=_node(config),
    )
    _spool(config).write(event)
    print(event.id)
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    config = load_config(args.config, sections=("producer",))
    spool = _spool(config)
    try:
        stats = spool.stats()
        running = spool.forwarders_running()
    except OSError as exc:  # a file where the directory should be, say
        raise SpoolError(f"cannot read spool {spool.directory}: {exc.strerror or exc}") from None
    status = spool.read_status()
    age = (time.time_ns() - stats.oldest_ns) / 1e9 if stats.oldest_ns else None
    report = {
        "spool": str(spool.directory),
        "events": stats.events,
        "bytes": stats.bytes,
        "oldest_age_seconds": round(age, 3) if age is not None else None,
        "forwarders_running": running,
        # What the last forwarder said; with none running, as it stood when it stopped.
        "forwarder_connected": status.get("connected") if running else False,
        "published": status.get("published"),
        "last_error": status.get("last_error") or None,
        "last_error_time": status.get("last_error_time") or None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"spool:          {report['spool']}")
    print(f"events waiting: {stats.events} ({stats.bytes} bytes)")
    print(f"oldest event:   {'-' if age is None else f'{age:.1f} s ago'}")
    if not running:
        print("forwarder:      not running (`clusteralert-producer run` forwards the spool)")
    else:
        print(
            f"forwarder:      {'connected' if status.get('connected') else 'not connected'}"
            f", {status.get('published', 0)} published since it started"
        )
    error_time = status.get("last_error_time")
    when = (
        f" ({time.time() - float(error_time):.0f} s ago)"
        if isinstance(error_time, (int, float)) and error_time
        else ""
    )
    print(f"last error:     {status.get('last_error') or '-'}{when}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from producer.forward import Forwarder
    from shared.logs import setup_logging

    setup_logging(args.verbose, args.log_format)
    config = load_config(args.config, sections=("producer", "broker", "catalog"))
    spool = _spool(config)
    followers = []
    if config.producer.follow:
        from producer.follow import LogFollower
        from shared.catalog import load_catalog

        spool.ensure()
        catalog = load_catalog(config.catalog.paths)
        followers = [
            LogFollower(f, spool, catalog, cluster=config.producer.cluster, node=_node(config))
            for f in config.producer.follow
        ]
    from shared.own_events import heartbeat_event

    cluster, node, interval = (
        config.producer.cluster,
        _node(config),
        config.producer.heartbeat_interval,
    )
    forwarder = Forwarder(
        spool,
        config.broker,
        confirm_timeout=config.producer.confirm_timeout,
        heartbeat=lambda: heartbeat_event(cluster, node, interval),
        heartbeat_interval=interval,
    )
    if config.producer.metrics_port:
        from producer.metrics import serve_metrics

        serve_metrics(config.producer.metrics_port, forwarder)
    on_stop_signal(lambda name: forwarder.stop())
    # Followers are sources beside the forwarder: they spool, it forwards.
    from producer.followers import Followers

    running = Followers(followers, forwarder.report_error)
    running.start()
    try:
        forwarder.run()
    finally:
        running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "emit": _emit,
        "run": _run,
        "pacemaker": _pacemaker,
        "keepalived": _keepalived,
        "status": _status,
    }
    return report_errors(PROG, lambda: commands[args.command](args))


def pacemaker_main() -> int:
    """``clusteralert-pacemaker-alert``: Pacemaker runs alert agents with no arguments,
    so this is what ``pcs alert create path=...`` points at."""
    return main(["pacemaker"])


if __name__ == "__main__":
    sys.exit(main())
