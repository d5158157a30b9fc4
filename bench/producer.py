"""Producer benchmarks (issue 4).

P1 emit cold start: wall time and peak RSS of a cold ``clusteralert-producer emit``
   process, against a bare ``python -c pass`` in the same run. Target: at most 3x wall.
P2 backlog drain: events/s forwarding 10,000 spooled events with the node agent's
   pipelined confirms, against one-confirm-per-message publishing (pika's
   BlockingChannel) in the same run. Target: at least 3x.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

from bench.common import amqp_url, report, vhost
from producer.forward import Forwarder
from producer.spool import Spool
from shared.config import parse_config
from shared.event import new_event, peek_event
from shared.topology import EVENTS_EXCHANGE
from worker.broker import connect_any, declare_topology

BIN = Path(sys.executable).parent
RUNS = 30
BACKLOG = 10_000


def _cold(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process. The RSS comes from GNU time: a
    child forked from this (large) process would report our own size until its exec."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    return wall, int(result.stderr.strip().splitlines()[-1])


def bench_emit() -> dict[str, float]:
    # An installed package has bytecode; this workplace sets PYTHONDONTWRITEBYTECODE, and
    # compiling our modules on every cold start would be measured otherwise.
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "shared"), str(root / "producer")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.toml"
        config.write_text(f'[producer]\nspool_dir = "{tmp}/spool"\n')
        env = {**os.environ, "CLUSTERALERT_CONFIG": str(config)}
        bare_argv = [sys.executable, "-c", "pass"]
        emit_argv = [
            str(BIN / "clusteralert-producer"),
            "emit",
            "--module",
            "rm",
            "--event-id",
            "9",
            "--param",
            "monitor=httpw",
        ]
        bare, emit = [], []
        for _ in range(RUNS):  # interleaved, so both see the same machine state
            bare.append(_cold(bare_argv, env))
            emit.append(_cold(emit_argv, env))
    figures = {
        "bare_wall_ms": statistics.median(w for w, _ in bare) * 1000,
        "emit_wall_ms": statistics.median(w for w, _ in emit) * 1000,
        "bare_rss_kib": statistics.median(r for _, r in bare),
        "emit_rss_kib": statistics.median(r for _, r in emit),
    }
    figures["wall_ratio"] = figures["emit_wall_ms"] / figures["bare_wall_ms"]
    figures["rss_ratio"] = figures["emit_rss_kib"] / figures["bare_rss_kib"]
    return figures


def _fill(spool: Spool, count: int) -> None:
    for i in range(count):
        spool.write(
            new_event(
                module="rm",
                event_id=i % 100,
                cluster="c",
                node=f"n{i % 9}",
                source="bench",
                params={"monitor": f"m{i}"},
            )
        )


def _one_by_one(spool: Spool, url: str) -> float:
    """The baseline: publish each file and wait for its confirm before the next."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    started = time.perf_counter()
    for path in spool.pending():
        body = path.read_bytes()
        # The same light check the agent does, so only the publishing strategy differs.
        event_id, key = peek_event(body)
        channel.basic_publish(
            EVENTS_EXCHANGE,
            key,
            body,
            mandatory=True,
            properties=pika.BasicProperties(delivery_mode=2, message_id=event_id),
        )
        path.unlink()
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def _pipelined(spool: Spool, url: str) -> float:
    broker = parse_config({"broker": {"urls": [url]}}, sections=("broker",)).broker
    forwarder = Forwarder(spool, broker)
    thread = threading.Thread(target=forwarder.run)
    started = time.perf_counter()
    thread.start()
    while forwarder.published < BACKLOG:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    forwarder.stop()
    thread.join(30)
    return elapsed


def bench_drain() -> dict[str, float]:
    with vhost() as name, tempfile.TemporaryDirectory() as tmp:
        url = amqp_url(name)
        broker = parse_config({"broker": {"urls": [url]}}, sections=("broker",)).broker
        with connect_any(broker)[0] as connection:
            declare_topology(connection.default_channel)
        baseline_spool = Spool(Path(tmp) / "baseline")
        _fill(baseline_spool, BACKLOG)
        baseline = _one_by_one(baseline_spool, url)
        agent_spool = Spool(Path(tmp) / "agent")
        _fill(agent_spool, BACKLOG)
        agent = _pipelined(agent_spool, url)
    return {
        "events": BACKLOG,
        "one_by_one_per_s": BACKLOG / baseline,
        "pipelined_per_s": BACKLOG / agent,
        "ratio": baseline / agent,
    }


def main() -> None:
    emit = bench_emit()
    drain = bench_drain()
    report(
        "producer",
        [
            (
                "P1 bare python -c pass",
                f"{emit['bare_wall_ms']:.1f} ms, {emit['bare_rss_kib']:.0f} KiB",
            ),
            ("P1 cold emit", f"{emit['emit_wall_ms']:.1f} ms, {emit['emit_rss_kib']:.0f} KiB"),
            (
                "P1 emit / bare (target <= 3x)",
                f"{emit['wall_ratio']:.2f}x wall, {emit['rss_ratio']:.2f}x RSS",
            ),
            ("P2 one confirm per message", f"{drain['one_by_one_per_s']:.0f} events/s"),
            ("P2 node agent, pipelined", f"{drain['pipelined_per_s']:.0f} events/s"),
            ("P2 agent / one-by-one (target >= 3x)", f"{drain['ratio']:.2f}x"),
        ],
        {"emit": emit, "drain": drain},
    )


if __name__ == "__main__":
    main()
