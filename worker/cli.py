"""``clusteralert-worker``: consume events and deliver mail; validate config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import cast

from shared.catalog import load_catalog, load_catalog_checked
from shared.cli import Version, on_stop_signal, report_errors
from shared.config import (
    SECTIONS,
    Config,
    EventLoop,
    config_secrets,
    is_plain_address,
    load_config,
)
from shared.errors import ClusteralertError, ConfigError, Problem
from shared.levels import Level, level_rank
from shared.logs import setup_logging
from worker.catalog_cli import add_catalog_parser, run_catalog
from worker.dlq_cli import add_dlq_parser
from worker.silence_cli import add_silence_parser, run_silence

__all__ = ["main"]

PROG = "clusteralert-worker"
# Every section of the shared config file but the node agent's own.
WORKER_SECTIONS = tuple(section for section in SECTIONS if section != "producer")

log = logging.getLogger(PROG)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text[:40]!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Deliver cluster events as mail.")
    parser.add_argument("--version", action=Version)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="consume events and send mail until stopped")
    run.add_argument(
        "--config",
        help="config file (default: $CLUSTERALERT_CONFIG, "
        "then /etc/clusteralert/clusteralert.toml)",
    )
    run.add_argument(
        "--metrics-port", type=_port, help="override [metrics] port (0 to 65535); 0 disables"
    )
    run.add_argument("-v", "--verbose", action="store_true")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    check = sub.add_parser("check-config", help="validate config and catalog")
    check.add_argument("--config", help="config file")
    check.add_argument(
        "--probe",
        action="store_true",
        help="also connect to each relay (TLS, certificate, AUTH) without sending",
    )
    test_mail = sub.add_parser(
        "test-mail", help="send one test mail through each relay, showing every step"
    )
    test_mail.add_argument("--config", help="config file")
    test_mail.add_argument("--relay", type=int, metavar="N", help="only relay N (1 = first)")
    test_mail.add_argument(
        "--to", action="append", default=[], metavar="ADDR", help="recipient (default [mail] to)"
    )
    add_dlq_parser(sub)
    add_catalog_parser(sub)
    add_silence_parser(sub)
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
    problems.extend(_follower_warnings(args.config))
    for problem in problems:
        print(problem)
    errors = sum(1 for p in problems if p.severity == "error")
    warnings = len(problems) - errors
    # The count is the config's: with --probe the relays' own verdict follows it.
    print(f"{errors} error(s), {warnings} warning(s) in the config", file=sys.stderr)
    if args.probe and not errors:
        from worker.mail_probe import probe_relays

        if not probe_relays(config, _say, send=False):
            print("the relay probe failed (see above)", file=sys.stderr)
            return 1
    return 1 if errors else 0


def _follower_warnings(config_path: str | None) -> list[Problem]:
    """A followed log whose events carry no level of their own: kinds missing from the
    catalog count as info there, and the unknown-event policy may filter every one of
    them. Say so before the first alert goes missing."""
    try:
        config = load_config(config_path, sections=("producer", "filter"))
    except ConfigError:
        return []  # reported by the main check when these sections are wrong
    policy = config.filter.unknown
    warnings = []
    for i, follow in enumerate(config.producer.follow):
        if any("(?P<level>" in pattern for pattern in follow.patterns):
            continue  # each line says its level
        # The config reader only accepts known levels here.
        level = cast(Level, follow.level or "info")
        if policy != "never" and level_rank(level) >= level_rank(policy):
            continue
        warnings.append(
            Problem(
                f"producer.follow[{i}]",
                f"events from {follow.path} of kinds not in the catalog have level {level}, "
                f"and [filter] unknown = {policy!r} filters them (counted, not mailed); "
                "the shipped catalog knows CLUSTERPRO's kinds (see 'catalog list'); for "
                "others add catalog entries, set this follower's level, or lower "
                "[filter] unknown",
                "warning",
            )
        )
    return warnings


def _say(line: str) -> None:
    print(line, flush=True)


def _test_mail(args: argparse.Namespace) -> int:
    from worker.mail_probe import probe_relays

    config = load_config(args.config, sections=WORKER_SECTIONS)
    if args.relay is not None and not 1 <= args.relay <= len(config.smtp):
        count = len(config.smtp)
        raise ConfigError(
            [Problem("--relay", f"no relay {args.relay}: the config has {count}, 1 to {count}")]
        )
    to = tuple(args.to)
    for address in to:
        if not is_plain_address(address):
            raise ConfigError([Problem("--to", f"not a plain e-mail address: {address!r:.80}")])
    if not to and not config.mail.to:
        raise ConfigError([Problem("--to", "no recipient: give --to or set [mail] to")])
    ok = probe_relays(config, _say, send=True, relay_index=args.relay, to=to)
    return 0 if ok else 1


def _dlq(args: argparse.Namespace) -> int:
    from worker.dlq_cli import run_dlq

    return run_dlq(args)


def new_event_loop(kind: EventLoop) -> asyncio.AbstractEventLoop:
    """The loop that renders and sends mail. uvloop's is the same asyncio API in compiled
    code, and took about a sixth off the worker's CPU per mail in B1 (README,
    "Benchmarks"); where it is not installed, the standard loop does the same work."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("[worker] event_loop is uvloop, which is not installed; using asyncio's")
        else:
            log.info("sending mail on the uvloop event loop")
            return uvloop.new_event_loop()
    log.info("sending mail on the asyncio event loop")
    return asyncio.new_event_loop()


def _run(args: argparse.Namespace) -> int:
    # Imported here so that check-config works without the worker extra's heavy imports.
    from prometheus_client import start_http_server

    from worker.consume import Consumer
    from worker.incident_stage import bundle_size
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
        try:
            start_http_server(port, registry=metrics.registry)
        except OSError as exc:  # another worker on this host has it, say
            raise ClusteralertError(
                f"cannot serve metrics on port {port}: {exc.strerror or exc}"
            ) from None
        log.info("metrics on :%d/metrics", port)

    loop = new_event_loop(config.worker.event_loop)
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
        max_hold=config.worker.max_hold,
        worker_name=socket.gethostname(),
        scrub=scrub,
        canary_to=config.canary.to,
    )
    incident = config.incident
    bundle = bundle_size(
        incident.bundle,
        prefetch=config.worker.prefetch,
        max_hold=config.worker.max_hold,
        rates=[relay.rate_limit for relay in config.smtp],
    )
    if bundle < incident.bundle:
        log.info(
            "notifications go out in bundles of at most %d, not %d: a relay's rate_limit "
            "could not send %d bundles of %d within half of max_hold",
            bundle,
            incident.bundle,
            config.worker.prefetch,
            incident.bundle,
        )
        incident = dataclasses.replace(incident, bundle=bundle)
    consumer = Consumer(
        config.broker,
        pipeline,
        metrics,
        loop,
        prefetch=config.worker.prefetch,
        shutdown_grace=config.worker.shutdown_grace,
        incident=incident,
        canary_interval=config.canary.interval,
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
    commands = {
        "run": _run,
        "check-config": _check_config,
        "test-mail": _test_mail,
        "dlq": _dlq,
        "catalog": run_catalog,
        "silence": run_silence,
    }
    return report_errors(PROG, lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
