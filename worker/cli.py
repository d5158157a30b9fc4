"""``clusteralert-worker``: consume events and deliver mail; validate config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

from shared.catalog import load_catalog, load_catalog_checked
from shared.cli import on_stop_signal, report_errors
from shared.config import Config, config_secrets, load_config
from shared.errors import ConfigError, Problem
from shared.logs import setup_logging
from worker.catalog_cli import add_catalog_parser, run_catalog
from worker.dlq_cli import add_dlq_parser

__all__ = ["main"]

PROG = "clusteralert-worker"
WORKER_SECTIONS = ("broker", "mail", "smtp", "filter", "catalog", "metrics", "worker", "route")

log = logging.getLogger(PROG)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Deliver cluster events as mail.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="consume events and send mail until stopped")
    run.add_argument(
        "--config",
        help="config file (default: $CLUSTERALERT_CONFIG, "
        "then /etc/clusteralert/clusteralert.toml)",
    )
    run.add_argument("--metrics-port", type=int, help="override [metrics] port; 0 disables")
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    check = sub.add_parser("check-config", help="validate config and catalog")
    check.add_argument("--config", help="config file")
    add_dlq_parser(sub)
    add_catalog_parser(sub)
    return parser


def _check_config(args: argparse.Namespace) -> int:
    problems: list[Problem] = []
    try:
        config = load_config(args.config, sections=WORKER_SECTIONS)
        problems.extend(config.warnings)
        catalog_paths = config.catalog.paths
    except ConfigError as exc:
        problems.extend(exc.problems)
        # Still check the catalog when only other sections are wrong, so one run shows
        # every problem.
        try:
            catalog_paths = load_config(args.config, sections=("catalog",)).catalog.paths
        except ConfigError:
            catalog_paths = ()
    _, catalog_problems = load_catalog_checked(catalog_paths)
    problems.extend(catalog_problems)
    for problem in problems:
        print(problem)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    print(f"{errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if errors else 0


def _dlq(args: argparse.Namespace) -> int:
    from worker.dlq_cli import run_dlq

    return run_dlq(args)


def _run(args: argparse.Namespace) -> int:
    # Imported here so that check-config works without the worker extra's heavy imports.
    from prometheus_client import start_http_server

    from worker.consume import Consumer
    from worker.metrics import Metrics
    from worker.pipeline import Pipeline
    from worker.render import Renderer
    from worker.scrub import Scrubber, scrub_logs
    from worker.send import Sender

    setup_logging(args.verbose, args.log_format)
    config: Config = load_config(args.config, sections=WORKER_SECTIONS)
    scrub = Scrubber(config_secrets(config))
    # Whatever a library or a relay puts in a log line, the secrets come out masked.
    scrub_logs(scrub)
    for warning in config.warnings:
        log.warning("%s", warning)
    catalog = load_catalog(config.catalog.paths)
    metrics = Metrics(relay.label for relay in config.smtp)
    port = config.metrics.port if args.metrics_port is None else args.metrics_port
    if port:
        start_http_server(port, registry=metrics.registry)
        log.info("metrics on :%d/metrics", port)

    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, name="smtp-loop", daemon=True)
    loop_thread.start()
    sender = Sender(config.smtp, metrics)
    pipeline = Pipeline(
        catalog,
        config.filter,
        Renderer(config.mail, routes=config.routes),
        sender,
        metrics,
        retry_window=timedelta(seconds=config.worker.retry_window),
        worker_name=socket.gethostname(),
        scrub=scrub,
    )
    consumer = Consumer(
        config.broker,
        pipeline,
        metrics,
        loop,
        prefetch=config.worker.prefetch,
        shutdown_grace=config.worker.shutdown_grace,
    )
    stop = threading.Event()

    def on_stop(name: str) -> None:
        log.info("received %s; shutting down", name)
        stop.set()

    on_stop_signal(on_stop)
    log.info(
        "catalog has %d entries; %d relay(s): %s",
        len(catalog),
        len(config.smtp),
        ", ".join(f"{r.label} ({r.security})" for r in config.smtp),
    )
    try:
        consumer.run(stop)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(sender.close(), loop).result(timeout=10)
        except Exception as exc:
            log.warning("closing relay connections: %s", exc or type(exc).__name__)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": _run, "check-config": _check_config, "dlq": _dlq, "catalog": run_catalog}
    return report_errors(PROG, lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
