"""Worker benchmarks (issue 7), against the real local RabbitMQ and the real worker
processes, with a STARTTLS relay in a process of its own.

B1 throughput: mails/s draining N pre-published events through one worker to a fast
   relay; in the same run, a naive consumer (smtplib connect + STARTTLS + send + ack per
   mail) and the ceiling (an aiosmtplib pool writing pre-rendered mails, no broker).
B2 slow relay: 100 ms per DATA, at the default and at 16 ``max_connections``, vs naive.
B3 latency: spool write to relay acceptance through producer, broker, worker and relay,
   at 50 events/s for 60 s (an in-process emitter using the producer's spool writer);
   plus a cold ``emit``'s end-to-end latency.
B4 scale-out: 1, 2 and 4 workers against the slow relay, 4 connections each.
B5 memory: worker peak RSS during B1, and RSS growth across 50,000 mails.
B8 far relay: 25 ms round trip (a delay proxy, 12.5 ms each way), 4 connections, 2,000
   mails, to a relay offering PIPELINING and to one that does not, against the ideal
   ``4 / (round trips x 0.025)``.

B1 and B8 run against a relay offering PIPELINING, as Postfix, Exchange Online and Gmail
do, and in the same run against one that does not.

``--smoke`` runs every part with tiny sizes so CI keeps the harness working; it asserts
nothing about timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pika

from bench.common import amqp_url, report, suite_args, suite_name, vhost
from bench.cpu import CpuMeter, broker_pid, most_per_s
from bench.relay import BenchRelay, make_certs
from bench.wan import Wan
from shared.topology import EVENTS_EXCHANGE, WORK_QUEUE

BIN = Path(sys.executable).parent


@dataclass
class Sizes:
    b1: int = 5000
    b1_rounds: int = 3
    naive: int = 1000
    b2: int = 1000
    b2_naive: int = 100
    b3_seconds: float = 60.0
    b4: int = 1000
    b5: int = 50_000
    b8: int = 2000


SMOKE = Sizes(
    b1=200, b1_rounds=1, naive=50, b2=100, b2_naive=10, b3_seconds=3.0, b4=100, b5=400, b8=50
)
WAN_ONE_WAY = 0.0125  # seconds each way: a 25 ms round trip
PARTS = ("b1", "b2", "b3", "b4", "b5", "b8")
# One mail per event, as the figures have always measured (the incident stage still takes
# every event first): 0.1's behaviour.
GROUPING_OFF = "group_wait = 0\nstorm_threshold = 0\n"


# -- the system under test -------------------------------------------------------------------


def _event(i: int) -> tuple[str, bytes]:
    event_id = str(uuid.uuid4())
    body = json.dumps(
        {
            "v": 1,
            "id": event_id,
            "time": datetime.now(UTC).isoformat(),
            "cluster": "bench",
            "node": f"node{i % 16}",
            "module": "monitor",
            "event_id": 1,
            "params": {"monitor": f"httpw{i % 50}", "detail": "no answer in 30 s"},
            "source": "bench",
        }
    ).encode()
    return event_id, body


def _publish(name: str, count: int, *, direct: bool = False) -> None:
    """Pre-publish ``count`` events with publisher confirms (pika waits for each): to the
    events exchange as producers do, or, ``direct``, straight onto the mail queue as 0.1
    routed them, past the incident stage (the delivery stage still mails a bare event)."""
    exchange, key = ("", WORK_QUEUE) if direct else (EVENTS_EXCHANGE, "monitor.1.n")
    with pika.BlockingConnection(pika.URLParameters(amqp_url(name))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)
        for i in range(count):
            _, body = _event(i)
            channel.basic_publish(exchange, key, body, props)


def _declare(name: str) -> None:
    from shared.config import parse_config
    from worker.broker import connect_any, declare_topology

    broker = parse_config({"broker": {"urls": [amqp_url(name)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)


def _config(
    tmp: Path,
    name: str,
    relay: BenchRelay,
    ca: Path,
    *,
    connections: int,
    spool: Path | None = None,
    port: int | None = None,
    incident: str = GROUPING_OFF,
) -> Path:
    config = tmp / f"worker-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        f'[broker]\nurls = ["{amqp_url(name)}"]\n'
        f'[producer]\nspool_dir = "{spool or tmp / "spool"}"\n'
        '[mail]\nfrom = "cluster@example.com"\nto = ["ops@example.com"]\n'
        f'[[smtp]]\nhost = "127.0.0.1"\nport = {port or relay.port}\nsecurity = "starttls"\n'
        f'ca_file = "{ca}"\nmax_connections = {connections}\n'
        f"[incident]\n{incident}"
    )
    return config


def _start_worker(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "clusteralert-worker"), "run", "--config", str(config), "--metrics-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(60)


def _rate(relay: BenchRelay, count: int, timeout: float, skip: int = 0) -> float:
    """Mails/s between the first and the last of ``count`` arrivals after ``skip``."""
    arrivals = relay.wait_for(skip + count, timeout)[skip : skip + count]
    span = arrivals[-1].at - arrivals[0].at
    return (len(arrivals) - 1) / span if span > 0 else float("inf")


def _measured(
    relay: BenchRelay, count: int, timeout: float, pids: dict[str, int | None]
) -> tuple[float, dict[str, float]]:
    """:func:`_rate`, and the CPU per mail of ``pids`` from the first arrival to the last
    (start-up, imports and connecting are not in it)."""
    meter = CpuMeter(pids)
    before = len(relay.wait_for(1, timeout))
    meter.start()
    rate = _rate(relay, count, timeout)
    return rate, meter.stop(count - before)


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Drain(NamedTuple):
    """What one drain by worker processes measured."""

    per_s: float
    peak_rss_kib: int  # the first worker's
    cpu_ms: dict[str, float]  # per mail: each worker, the broker, the relay, and the total


def workers_rate(
    tmp: Path,
    ca: Path,
    count: int,
    *,
    workers: int,
    connections: int,
    delay: float,
    pipelining: bool = False,
    wan: float = 0.0,
    direct: bool = False,
) -> Drain:
    """Mails/s of ``workers`` processes draining ``count`` events, the first one's peak
    RSS and the CPU per mail. ``wan``: one-way delay of a proxy between worker and relay;
    ``direct``: events put straight on the mail queue, past the incident stage."""
    with contextlib.ExitStack() as stack:
        name = stack.enter_context(vhost())
        relay = stack.enter_context(BenchRelay(tmp, delay, pipelining=pipelining))
        port = stack.enter_context(Wan(relay.port, wan)).port if wan else relay.port
        _declare(name)
        _publish(name, count, direct=direct)
        config = _config(tmp, name, relay, ca, connections=connections, port=port)
        procs = [_start_worker(config) for _ in range(workers)]
        pids: dict[str, int | None] = {
            "worker" if n == 0 else f"worker{n + 1}": proc.pid for n, proc in enumerate(procs)
        }
        try:
            rate, cpu = _measured(
                relay,
                count,
                max(120.0, count / 5),
                pids | {"broker": broker_pid(), "relay": relay.pid},
            )
            peak = _rss_kib(procs[0].pid, "VmHWM")
        finally:
            _stop(procs)
    return Drain(rate, peak, cpu)


# -- baselines ---------------------------------------------------------------------------------


def _naive(name: str, port: int, ca: str, count: int) -> None:
    """The peer's way: per message, connect, STARTTLS, send, quit, then ack."""
    context = ssl.create_default_context(cafile=ca)
    with pika.BlockingConnection(pika.URLParameters(amqp_url(name))) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        for done, (method, _, body) in enumerate(channel.consume("clusteralert.incoming"), 1):
            event = json.loads(body)
            message = (
                f"From: cluster@example.com\r\nTo: ops@example.com\r\n"
                f"Message-ID: <{event['id']}@example.com>\r\nSubject: x\r\n\r\n"
                f"{event['params']}\r\n"
            ).encode()
            with smtplib.SMTP("127.0.0.1", port) as smtp:
                smtp.starttls(context=context)
                smtp.sendmail("cluster@example.com", ["ops@example.com"], message)
            channel.basic_ack(method.delivery_tag)
            if done == count:
                break
        channel.cancel()


def naive_rate(tmp: Path, ca: Path, count: int, delay: float) -> float:
    with vhost() as name, BenchRelay(tmp, delay) as relay:
        _declare(name)
        _publish(name, count)
        proc = multiprocessing.Process(target=_naive, args=(name, relay.port, str(ca), count))
        proc.start()
        try:
            return _rate(relay, count, timeout=max(120.0, count * (delay + 0.05) * 2))
        finally:
            proc.join(30)


def _ceiling(port: int, ca: str, count: int, connections: int) -> None:
    import aiosmtplib

    from shared.config import MailConfig
    from shared.event import new_event
    from shared.filter import Decision
    from worker.render import Renderer

    renderer = Renderer(MailConfig(sender="cluster@example.com", to=("ops@example.com",)))
    mails = [
        renderer.render(
            new_event(
                module="monitor",
                event_id=1,
                cluster="c",
                node="n",
                source="bench",
                level="error",
                text=f"m{i}",
            ),
            Decision(True, "error", None, None, "bench"),
        ).data
        for i in range(count)
    ]
    context = ssl.create_default_context(cafile=ca)

    async def client(share: list[bytes]) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=context)
        await smtp.connect()
        for data in share:
            await smtp.sendmail("cluster@example.com", ["ops@example.com"], data)
        await smtp.quit()

    async def main() -> None:
        await asyncio.gather(*(client(mails[i::connections]) for i in range(connections)))

    asyncio.run(main())


def ceiling_rate(
    tmp: Path, ca: Path, count: int, connections: int = 8
) -> tuple[float, dict[str, float]]:
    """Mails/s, and the CPU per mail of the sending process and of the relay."""
    with BenchRelay(tmp) as relay:
        proc = multiprocessing.Process(
            target=_ceiling, args=(relay.port, str(ca), count, connections)
        )
        proc.start()
        try:
            return _measured(relay, count, 120, {"client": proc.pid, "relay": relay.pid})
        finally:
            proc.join(30)


# -- B3: latency through the whole pipeline ------------------------------------------------------


def latency(tmp: Path, ca: Path, seconds: float, per_second: float = 50.0) -> dict[str, float]:
    from producer.spool import Spool
    from shared.event import new_event

    spool_dir = tmp / "b3-spool"
    with vhost() as name, BenchRelay(tmp) as relay:
        _declare(name)
        config = _config(tmp, name, relay, ca, connections=4, spool=spool_dir)
        worker = _start_worker(config)
        producer = subprocess.Popen(
            [str(BIN / "clusteralert-producer"), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Warm up: the first event waits for connections to open.
            spool = Spool(spool_dir)
            spool.write(
                new_event(
                    module="monitor",
                    event_id=1,
                    cluster="c",
                    node="n",
                    source="bench",
                    params={"monitor": "warm", "detail": "x"},
                )
            )
            relay.wait_for(1, 60)
            written: dict[str, float] = {}
            total = int(seconds * per_second)
            started = time.monotonic()
            for i in range(total):
                due = started + i / per_second
                time.sleep(max(0.0, due - time.monotonic()))  # a steady pace, not a wait
                event = new_event(
                    module="monitor",
                    event_id=1,
                    cluster="c",
                    node="n",
                    source="bench",
                    params={"monitor": f"m{i}", "detail": "x"},
                )
                spool.write(event)
                written[event.id] = time.time()
            arrivals = relay.wait_for(1 + total, 120)[1:]
            lat = sorted(
                (a.at - written[a.event_id]) * 1000 for a in arrivals if a.event_id in written
            )
            # A cold emit, end to end, a few times.
            cold = []
            env = {**os.environ, "CLUSTERALERT_CONFIG": str(config)}
            for _ in range(5):
                before = len(relay.arrivals())
                t0 = time.time()
                out = subprocess.run(
                    [
                        str(BIN / "clusteralert-producer"),
                        "emit",
                        "--module",
                        "monitor",
                        "--event-id",
                        "1",
                        "--param",
                        "monitor=cold",
                        "detail=x",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                event_id = out.stdout.strip()
                arrived = relay.wait_for(before + 1, 30)
                arrival = next(a for a in arrived if a.event_id == event_id)
                cold.append((arrival.at - t0) * 1000)
        finally:
            _stop([producer, worker])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))]

    return {
        "events": len(lat),
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1],
        "cold_emit_ms_median": statistics.median(cold),
    }


# -- B5: memory growth -------------------------------------------------------------------------


def memory_growth(tmp: Path, ca: Path, count: int) -> dict[str, float]:
    with vhost() as name, BenchRelay(tmp) as relay:
        _declare(name)
        publisher = threading.Thread(target=_publish, args=(name, count))
        publisher.start()
        worker = _start_worker(_config(tmp, name, relay, ca, connections=4))
        try:
            relay.wait_for(count // 5, 600)
            early = _rss_kib(worker.pid, "VmRSS")
            relay.wait_for(count, 1200)
            late = _rss_kib(worker.pid, "VmRSS")
            peak = _rss_kib(worker.pid, "VmHWM")
        finally:
            publisher.join()
            _stop([worker])
    return {
        "mails": count,
        "rss_after_20pct_kib": early,
        "rss_at_end_kib": late,
        "growth_kib": late - early,
        "peak_kib": peak,
    }


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _median_each(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each key's median over the runs."""
    return {key: _median(runs, key) for key in runs[0]}


def _cpu_row(cpu_ms: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in cpu_ms.items() if name != "total")
    return (
        f"{parts}; total {cpu_ms['total']:.2f}: at most {most_per_s(cpu_ms):.0f} mails/s "
        f"on {os.cpu_count()} busy cores"
    )


def main(argv: list[str] | None = None) -> None:
    smoke, parts = suite_args("python -m bench worker", PARTS, argv)
    sizes = SMOKE if smoke else Sizes()
    figures: dict[str, object] = {"smoke": smoke}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ca = make_certs(tmp)
        b1_peak = 0
        if "b5" in parts and "b1" not in parts:
            b1_peak = workers_rate(
                tmp, ca, sizes.b1, workers=1, connections=4, delay=0.0, pipelining=True
            ).peak_rss_kib
        if "b1" in parts:
            # Rounds of every side in turn, and the medians: one run of each moves by a
            # fifth from one minute to the next on a shared machine.
            runs: dict[str, list[float]] = {
                k: [] for k in ("worker", "plain", "naive", "ceiling", "ceiling_8")
            }
            worker_cpu: list[dict[str, float]] = []
            ceiling_cpu: list[dict[str, float]] = []
            for _ in range(sizes.b1_rounds):
                drain = workers_rate(
                    tmp, ca, sizes.b1, workers=1, connections=4, delay=0.0, pipelining=True
                )
                runs["worker"].append(drain.per_s)
                worker_cpu.append(drain.cpu_ms)
                b1_peak = max(b1_peak, drain.peak_rss_kib)
                runs["plain"].append(
                    workers_rate(tmp, ca, sizes.b1, workers=1, connections=4, delay=0.0).per_s
                )
                runs["naive"].append(naive_rate(tmp, ca, sizes.naive, 0.0))
                # Like for like: the ceiling sends the worker's own rendered mail over as
                # many connections as the worker uses (4); the 8-connection figure beside it.
                rate, cpu = ceiling_rate(tmp, ca, sizes.b1, connections=4)
                runs["ceiling"].append(rate)
                ceiling_cpu.append(cpu)
                runs["ceiling_8"].append(ceiling_rate(tmp, ca, sizes.b1, connections=8)[0])
            b1, b1_plain, naive, ceiling, ceiling_8 = (
                statistics.median(runs[k])
                for k in ("worker", "plain", "naive", "ceiling", "ceiling_8")
            )
            cpu_w, cpu_c = _median_each(worker_cpu), _median_each(ceiling_cpu)
            figures["b1"] = {
                "rounds": sizes.b1_rounds,
                "runs_per_s": runs,
                "worker_per_s": b1,
                "worker_no_pipelining_per_s": b1_plain,
                "naive_per_s": naive,
                "ceiling_per_s": ceiling,
                "ceiling_8_connections_per_s": ceiling_8,
                "worker_over_naive": b1 / naive,
                "worker_over_ceiling": b1 / ceiling,
                "worker_cpu_ms_per_mail": cpu_w,
                "ceiling_cpu_ms_per_mail": cpu_c,
                "worker_cpu_bound_per_s": most_per_s(cpu_w),
                "ceiling_cpu_bound_per_s": most_per_s(cpu_c),
            }
            rows += [
                (
                    f"B1 medians of {sizes.b1_rounds} rounds; worker runs",
                    " / ".join(f"{r:.0f}" for r in runs["worker"]),
                ),
                ("B1 worker, fast relay with PIPELINING", f"{b1:.0f} mails/s"),
                ("B1 worker, fast relay without PIPELINING", f"{b1_plain:.0f} mails/s"),
                ("B1 naive (connect+STARTTLS per mail)", f"{naive:.0f} mails/s"),
                ("B1 ceiling (aiosmtplib, 4 connections, no broker)", f"{ceiling:.0f} mails/s"),
                ("B1 ceiling with 8 connections", f"{ceiling_8:.0f} mails/s"),
                ("B1 worker/naive (target >= 6x)", f"{b1 / naive:.1f}x"),
                ("B1 worker/ceiling (stretch 0.7x)", f"{b1 / ceiling:.2f}x"),
                ("B1 worker side, CPU ms per mail", _cpu_row(cpu_w)),
                ("B1 ceiling side, CPU ms per mail", _cpu_row(cpu_c)),
            ]
        if "b2" in parts:
            b2_default = workers_rate(tmp, ca, sizes.b2, workers=1, connections=4, delay=0.1).per_s
            b2_wide = workers_rate(tmp, ca, sizes.b2, workers=1, connections=16, delay=0.1).per_s
            b2_naive = naive_rate(tmp, ca, sizes.b2_naive, 0.1)
            figures["b2"] = {
                "default_4_per_s": b2_default,
                "connections_16_per_s": b2_wide,
                "naive_per_s": b2_naive,
                "wide_over_naive": b2_wide / b2_naive,
                "wide_over_ideal": b2_wide / (16 / 0.1),
            }
            rows += [
                ("B2 100 ms relay, 4 connections", f"{b2_default:.0f} mails/s"),
                (
                    "B2 100 ms relay, 16 connections",
                    f"{b2_wide:.0f} mails/s ({b2_wide / (16 / 0.1):.2f} of 160/s)",
                ),
                ("B2 naive", f"{b2_naive:.1f} mails/s"),
                ("B2 16 connections/naive (target >= 12x)", f"{b2_wide / b2_naive:.1f}x"),
            ]
        if "b3" in parts:
            b3 = latency(tmp, ca, sizes.b3_seconds)
            figures["b3"] = b3
            rows += [
                (
                    "B3 spool to relay at 50/s",
                    f"p50 {b3['p50_ms']:.0f} ms, p95 {b3['p95_ms']:.0f} ms, "
                    f"p99 {b3['p99_ms']:.0f} ms, max {b3['max_ms']:.0f} ms",
                ),
                ("B3 cold emit end to end", f"{b3['cold_emit_ms_median']:.0f} ms (median of 5)"),
            ]
        if "b4" in parts:
            b4 = {
                n: workers_rate(tmp, ca, sizes.b4, workers=n, connections=4, delay=0.1).per_s
                for n in (1, 2, 4)
            }
            figures["b4"] = {f"{n}_workers_per_s": r for n, r in b4.items()} | {
                "4_over_1": b4[4] / b4[1],
                "2_over_1": b4[2] / b4[1],
            }
            rows.append(
                (
                    "B4 1/2/4 workers, 100 ms relay",
                    " / ".join(f"{b4[n]:.0f}" for n in (1, 2, 4))
                    + f" mails/s; 4/1 = {b4[4] / b4[1]:.2f}x (target >= 3.5x)",
                )
            )
        if "b5" in parts:
            b5 = memory_growth(tmp, ca, sizes.b5)
            figures["b5"] = b5 | {"b1_peak_kib": b1_peak}
            rows += [
                ("B5 worker peak RSS in B1", f"{b1_peak / 1024:.1f} MiB"),
                (
                    f"B5 RSS growth over {b5['mails']} mails",
                    f"{b5['growth_kib'] / 1024:+.1f} MiB "
                    f"(from {b5['rss_after_20pct_kib'] / 1024:.1f})",
                ),
            ]
        if "b8" in parts:
            rtt = 2 * WAN_ONE_WAY
            far = {
                piped: workers_rate(
                    tmp,
                    ca,
                    sizes.b8,
                    workers=1,
                    connections=4,
                    delay=0.0,
                    pipelining=piped,
                    wan=WAN_ONE_WAY,
                ).per_s
                for piped in (True, False)
            }
            # Round trips per one-recipient mail in a steady stream: one with PIPELINING
            # (the body, with the next mail's MAIL, RCPT and DATA behind it); MAIL, RCPT,
            # DATA and the body without.
            ideal = {True: 4 / (1 * rtt), False: 4 / (4 * rtt)}
            figures["b8"] = {
                "rtt_ms": rtt * 1000,
                "pipelining_per_s": far[True],
                "no_pipelining_per_s": far[False],
                "ratio": far[True] / far[False],
                "ideal_pipelining_per_s": ideal[True],
                "ideal_no_pipelining_per_s": ideal[False],
            }
            rows += [
                (
                    f"B8 {rtt * 1000:.0f} ms RTT relay with PIPELINING, 4 connections",
                    f"{far[True]:.1f} mails/s (ideal {ideal[True]:.0f}/s)",
                ),
                (
                    "B8 same relay without PIPELINING",
                    f"{far[False]:.1f} mails/s (ideal {ideal[False]:.0f}/s)",
                ),
                ("B8 with/without (target >= 2x)", f"{far[True] / far[False]:.2f}x"),
            ]
    report(suite_name("worker", parts, PARTS, smoke), rows, figures)


if __name__ == "__main__":
    main()
