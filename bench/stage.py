"""What the incident stage costs and saves in the real pipeline (issue 12): the local
RabbitMQ, real ``clusteralert-worker run`` processes and the STARTTLS bench relay.

B7 storm: 10,000 distinct incidents on one cluster over 10 s, published live to the
   events exchange, with the default ``[incident]`` settings against one mail per event
   (``group_wait = 0``, ``storm_threshold = 0``: 0.1's behaviour) in the same run,
   alternating: mails sent, time from the first event to the first mail and to the last
   event mailed, and the worker's peak RSS.
Hop: B1's 5,000 events through the incident stage with grouping off, against the same
   events put straight on the mail queue as 0.1 routed them (the same worker, whose
   delivery stage still mails a bare event), alternating; the cost of the extra hop.
B3 with the stage: spool write to relay acceptance at 50 events/s, grouping off.

Runs alternate (A B, B A, ...) so that both sides see the same machine, and each figure
is kept with the load average at its end; the summary gives medians. ``--smoke`` runs
everything tiny (CI does; no timing is asserted), with a 3 s storm window so that the
storm's last digest comes quickly.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pika

from bench.common import amqp_url, report, suite_args, suite_name, vhost
from bench.relay import BenchRelay, make_certs
from bench.worker import (
    GROUPING_OFF,
    _config,
    _declare,
    _median,
    _rss_kib,
    _start_worker,
    _stop,
    latency,
    workers_rate,
)
from shared.event import encode_event, new_event
from shared.topology import EVENTS_EXCHANGE

PARTS = ("b7", "hop", "b3")
PUBLISHERS = 8  # connections publishing the storm
STORM_TIMEOUT = 300.0  # seconds for a storm to be mailed in full (about 75 s expected)
STORM_CLUSTER = "storm"


@dataclass
class Sizes:
    storm: int = 10_000
    storm_seconds: float = 10.0
    storm_runs: int = 3  # of each mode
    storm_window: float | None = None  # None: the default
    hop: int = 5000
    hop_runs: int = 5
    b3_seconds: float = 60.0


SMOKE = Sizes(
    storm=300, storm_seconds=1.0, storm_runs=1, storm_window=3, hop=200, hop_runs=1, b3_seconds=3
)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _order(runs: int) -> list[bool]:
    """A B, B A, A B, ...: True for A."""
    return [flag for i in range(runs) for flag in ((True, False) if i % 2 == 0 else (False, True))]


# -- B7: a storm -------------------------------------------------------------------------------


def _storm_event(i: int) -> bytes:
    return encode_event(
        new_event(
            module="monitor",
            event_id=1,
            cluster=STORM_CLUSTER,
            node=f"node{i % 16}",
            reporter=f"node{i % 16}",
            source="bench",
            params={"monitor": f"m{i}", "detail": "no answer in 30 s"},
        )
    )


def _storm_publisher(name: str, bodies: list[bytes], dues: list[float]) -> None:
    props = pika.BasicProperties(delivery_mode=2)
    with pika.BlockingConnection(pika.URLParameters(amqp_url(name))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, due in zip(bodies, dues, strict=True):
            time.sleep(max(0.0, due - time.monotonic()))  # a steady pace, not a wait
            channel.basic_publish(EVENTS_EXCHANGE, "monitor.1.node", body, props, mandatory=True)


def _storm_publish(name: str, count: int, seconds: float) -> tuple[float, float]:
    """Publish ``count`` events evenly over ``seconds``, live, to the events exchange,
    each confirmed, as the node agents would. pika's blocking channel waits for each
    confirm, so several connections share the pace (event i on connection i mod N).
    Returns when the first was published (time.time()) and how long publishing took,
    which exceeds ``seconds`` when the machine cannot keep the pace."""
    bodies = [_storm_event(i) for i in range(count)]
    first = time.time()
    started = time.monotonic()
    dues = [started + i * seconds / count for i in range(count)]
    threads = [
        threading.Thread(
            target=_storm_publisher, args=(name, bodies[k::PUBLISHERS], dues[k::PUBLISHERS])
        )
        for k in range(PUBLISHERS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return first, time.monotonic() - started


def storm(tmp: Path, ca: Path, sizes: Sizes, *, grouped: bool) -> dict[str, float]:
    if grouped:
        incident = "" if sizes.storm_window is None else f"storm_window = {sizes.storm_window}\n"
    else:
        incident = GROUPING_OFF
    with vhost() as name, BenchRelay(tmp, pipelining=True) as relay:
        _declare(name)
        config = _config(tmp, name, relay, ca, connections=4, incident=incident)
        worker = _start_worker(config)
        try:
            # Warm up (connections open, code loaded) with one event of another cluster,
            # outside the storm's group; in the default mode it waits its group_wait.
            with pika.BlockingConnection(pika.URLParameters(amqp_url(name))) as connection:
                warm = new_event(
                    module="monitor",
                    event_id=1,
                    cluster="warm",
                    node="n",
                    source="bench",
                    params={"monitor": "warm", "detail": "x"},
                )
                connection.channel().basic_publish(
                    EVENTS_EXCHANGE, "monitor.1.n", encode_event(warm)
                )
            relay.wait_for(1, 60)
            first, spread = _storm_publish(name, sizes.storm, sizes.storm_seconds)
            try:
                relay.wait_for_events(1 + sizes.storm, STORM_TIMEOUT)
            except RuntimeError as exc:
                # Kept, not raised: the other runs still count, and the figure says so.
                print(f"  B7 incomplete: {exc}", flush=True)
            arrivals = relay.arrivals()[1:]
            peak = _rss_kib(worker.pid, "VmHWM")
        finally:
            _stop([worker])
    covered = sum(a.events for a in arrivals)
    return {
        "events": sizes.storm,
        "published_s": spread,
        "covered": covered,
        "mails": len(arrivals),
        "digests": sum(1 for a in arrivals if a.events > 1),
        "first_mail_s": arrivals[0].at - first,
        "all_mailed_s": arrivals[-1].at - first,
        "peak_rss_kib": peak,
        "load_1m": _load(),
    }


# -- the extra hop -----------------------------------------------------------------------------


def hop(tmp: Path, ca: Path, count: int, *, direct: bool) -> dict[str, float]:
    drain = workers_rate(
        tmp, ca, count, workers=1, connections=4, delay=0.0, pipelining=True, direct=direct
    )
    return {
        "mails_per_s": drain.per_s,
        "peak_rss_kib": drain.peak_rss_kib,
        "worker_cpu_ms": drain.cpu_ms["worker"],
        "broker_cpu_ms": drain.cpu_ms.get("broker", 0.0),
        "load_1m": _load(),
    }


def main(argv: list[str] | None = None) -> None:
    smoke, parts = suite_args("python -m bench stage", PARTS, argv)
    sizes = SMOKE if smoke else Sizes()
    figures: dict[str, object] = {"smoke": smoke}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ca = make_certs(tmp)
        if "b7" in parts:
            grouped: list[dict[str, float]] = []
            single: list[dict[str, float]] = []
            for is_grouped in _order(sizes.storm_runs):
                run = storm(tmp, ca, sizes, grouped=is_grouped)
                (grouped if is_grouped else single).append(run)
                print(f"  B7 {'default' if is_grouped else 'one per event'}: {run}", flush=True)
            figures["b7"] = {
                "events": sizes.storm,
                "seconds": sizes.storm_seconds,
                "default_runs": grouped,
                "one_per_event_runs": single,
                "median_default_mails": _median(grouped, "mails"),
                "median_one_per_event_mails": _median(single, "mails"),
                "median_default_first_mail_s": _median(grouped, "first_mail_s"),
                "median_one_per_event_first_mail_s": _median(single, "first_mail_s"),
                "median_default_all_mailed_s": _median(grouped, "all_mailed_s"),
                "median_one_per_event_all_mailed_s": _median(single, "all_mailed_s"),
                "median_published_s": _median(grouped + single, "published_s"),
                "incomplete_runs": sum(1 for r in grouped + single if r["covered"] < r["events"]),
                "median_default_peak_rss_kib": _median(grouped, "peak_rss_kib"),
                "median_one_per_event_peak_rss_kib": _median(single, "peak_rss_kib"),
            }
            b7 = figures["b7"]
            assert isinstance(b7, dict)
            rows += [
                (
                    f"B7 storm of {sizes.storm} in {sizes.storm_seconds:g} s, mails",
                    f"default {b7['median_default_mails']:.0f}, "
                    f"one per event {b7['median_one_per_event_mails']:.0f} "
                    f"(medians of {sizes.storm_runs})",
                ),
                (
                    "B7 storm published (confirmed) in",
                    f"{b7['median_published_s']:.1f} s; runs not mailed in full: "
                    f"{b7['incomplete_runs']}",
                ),
                (
                    "B7 first mail after the first event",
                    f"default {b7['median_default_first_mail_s']:.2f} s, "
                    f"one per event {b7['median_one_per_event_first_mail_s']:.3f} s",
                ),
                (
                    "B7 every event mailed after",
                    f"default {b7['median_default_all_mailed_s']:.1f} s, "
                    f"one per event {b7['median_one_per_event_all_mailed_s']:.1f} s",
                ),
                (
                    "B7 worker peak RSS",
                    f"default {b7['median_default_peak_rss_kib'] / 1024:.1f} MiB, "
                    f"one per event {b7['median_one_per_event_peak_rss_kib'] / 1024:.1f} MiB",
                ),
            ]
        if "hop" in parts:
            staged: list[dict[str, float]] = []
            direct: list[dict[str, float]] = []
            for through_stage in _order(sizes.hop_runs):
                run = hop(tmp, ca, sizes.hop, direct=not through_stage)
                (staged if through_stage else direct).append(run)
                label = "through the stage" if through_stage else "direct"
                print(f"  B1 {label}: {run}", flush=True)
            cost = 1 - _median(staged, "mails_per_s") / _median(direct, "mails_per_s")
            figures["hop"] = {
                "events": sizes.hop,
                "stage_runs": staged,
                "direct_runs": direct,
                "median_stage_per_s": _median(staged, "mails_per_s"),
                "median_direct_per_s": _median(direct, "mails_per_s"),
                "cost": cost,
                "target_cost": 0.15,
                "median_stage_worker_cpu_ms": _median(staged, "worker_cpu_ms"),
                "median_direct_worker_cpu_ms": _median(direct, "worker_cpu_ms"),
                "median_stage_broker_cpu_ms": _median(staged, "broker_cpu_ms"),
                "median_direct_broker_cpu_ms": _median(direct, "broker_cpu_ms"),
            }
            rows += [
                (
                    f"B1 {sizes.hop} events through the stage, grouping off",
                    f"{_median(staged, 'mails_per_s'):.0f} mails/s "
                    f"(median of {sizes.hop_runs}: "
                    + " / ".join(f"{r['mails_per_s']:.0f}" for r in staged)
                    + ")",
                ),
                (
                    "B1 same events straight to the mail queue (0.1)",
                    f"{_median(direct, 'mails_per_s'):.0f} mails/s (median of {sizes.hop_runs}: "
                    + " / ".join(f"{r['mails_per_s']:.0f}" for r in direct)
                    + ")",
                ),
                ("B1 cost of the extra hop (target <= 15%)", f"{cost:.1%}"),
                (
                    "B1 CPU ms per mail, through the stage / direct",
                    "worker "
                    + " / ".join(
                        f"{_median(runs, 'worker_cpu_ms'):.2f}" for runs in (staged, direct)
                    )
                    + ", broker "
                    + " / ".join(
                        f"{_median(runs, 'broker_cpu_ms'):.2f}" for runs in (staged, direct)
                    ),
                ),
            ]
        if "b3" in parts:
            b3 = latency(tmp, ca, sizes.b3_seconds) | {"load_1m": _load()}
            figures["b3"] = b3
            rows.append(
                (
                    "B3 spool to relay at 50/s, through the stage",
                    f"p50 {b3['p50_ms']:.0f} ms, p95 {b3['p95_ms']:.0f} ms, "
                    f"p99 {b3['p99_ms']:.0f} ms (target <= 100 ms), max {b3['max_ms']:.0f} ms",
                )
            )
    report(suite_name("stage", parts, PARTS, smoke), rows, figures)
