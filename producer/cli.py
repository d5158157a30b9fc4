"""``clusteralert-producer``: the node-side command.

``emit`` runs once per cluster event, often from a hook with a timeout, so it imports only
what spooling needs; pika is loaded by ``run`` alone.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

from shared.config import load_config
from shared.errors import ClusteralertError, ConfigError
from shared.event import new_event

__all__ = ["main"]

PROG = "clusteralert-producer"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Spool and forward cluster events.")
    sub = parser.add_subparsers(dest="command", required=True)

    emit = sub.add_parser("emit", help="spool one event durably and print its id")
    emit.add_argument("--module", required=True, help="event module, [a-z0-9_-]{1,32}")
    emit.add_argument("--event-id", required=True, type=int, help="event number, 0 or more")
    emit.add_argument("--level", choices=("info", "warning", "error"))
    emit.add_argument("--node", help="node name (default: [producer] node, else host name)")
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
    return parser


def _params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ClusteralertError(f"--param {pair[:40]!r}: expected KEY=VALUE")
        params[key] = value
    return params


def _emit(args: argparse.Namespace) -> int:
    from producer.spool import Spool

    config = load_config(args.config, sections=("producer",))
    event = new_event(
        module=args.module,
        event_id=args.event_id,
        level=args.level,
        cluster=args.cluster if args.cluster is not None else config.producer.cluster,
        node=args.node or config.producer.node or socket.gethostname(),
        params=_params(args.param),
        text=args.text,
        source=args.source,
    )
    Spool(config.producer.spool_dir).write(event)
    print(event.id)
    return 0


def _run(args: argparse.Namespace) -> int:
    from producer.forward import Forwarder
    from producer.spool import Spool
    from shared.logs import setup_logging

    setup_logging(args.verbose)
    config = load_config(args.config, sections=("producer", "broker"))
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Forwarder(Spool(config.producer.spool_dir), config.broker, lambda: stop).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "emit":
            return _emit(args)
        return _run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    except ClusteralertError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
