"""``clusteralert-producer``: the node-side command.

``emit`` runs once per cluster event, often from a hook with a timeout, so it imports only
what spooling needs; pika is loaded by ``run`` alone.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from shared.cli import on_stop_signal, report_errors
from shared.config import load_config
from shared.errors import ClusteralertError
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
    run.add_argument("--log-format", choices=("text", "json"), default="text")
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

    setup_logging(args.verbose, args.log_format)
    config = load_config(args.config, sections=("producer", "broker"))
    forwarder = Forwarder(Spool(config.producer.spool_dir), config.broker)
    on_stop_signal(lambda name: forwarder.stop())
    forwarder.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _emit if args.command == "emit" else _run
    return report_errors(PROG, lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
