"""B6: events per second through the incident engine on one core, storm off.

Two figures: the engine alone (events already decoded), and the stage's CPU path per
event: decode the event, offer it, tick, encode every notification it publishes. No
broker: this is the ceiling the stage's own code sets. The mix is a failover seen from
three reporters: each incident reported by every node, some reported again later
(folded), a share of them recovered (threaded).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from bench.common import report
from shared.catalog import load_catalog
from shared.config import FilterConfig, IncidentConfig
from shared.event import Event, decode_event, encode_event, new_event
from shared.notification import encode_notification
from worker.incident import IncidentEngine, Publish

TARGET = 5000
REPORTERS = ("node1", "node2", "node3")


def _events(count: int) -> list[Event]:
    base = datetime.now(UTC)
    template = new_event(
        module="rm",
        event_id=9,
        cluster="prod",
        node="db1",
        source="bench",
        params={"monitor": "m", "detail": "timeout", "code": "11"},
    )
    events: list[Event] = []
    for i in range(count):
        incident = i // 4
        kind = (("rm", 26) if incident % 5 == 0 else ("rm", 9)) if i % 4 == 3 else ("rm", 9)
        events.append(
            new_event(
                id=str(uuid.uuid4()),
                module=kind[0],
                event_id=kind[1],
                cluster=template.cluster,
                node=f"db{incident % 50}",
                source="bench",
                reporter=REPORTERS[i % 3],
                params={"monitor": f"m{incident}", "detail": "timeout", "code": "11"},
                time=base + timedelta(milliseconds=i),
            )
        )
    return events


def _run(events: list[Event], raw: list[bytes] | None) -> tuple[float, int, int]:
    """Seconds taken, notifications published, events acked at once."""
    engine: IncidentEngine[int] = IncidentEngine(
        IncidentConfig(group_wait=2, storm_threshold=0), load_catalog([]), FilterConfig()
    )
    published = acked = 0
    now = 0.0
    started = time.perf_counter()
    for handle in range(len(events)):
        event = decode_event(raw[handle]) if raw is not None else events[handle]
        now = handle / 5000  # arrival at 5,000/s of simulated time
        actions = engine.tick(now) + engine.offer(event, handle, now)
        for action in actions:
            if isinstance(action, Publish):
                published += 1
                if raw is not None:
                    encode_notification(action.notification)
            else:
                acked += 1
    for action in engine.flush(now + 10):
        if isinstance(action, Publish):
            published += 1
            if raw is not None:
                encode_notification(action.notification)
    return time.perf_counter() - started, published, acked


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    count = 50_000
    events = _events(count)
    raw = [encode_event(e) for e in events]
    _run(events[:2000], None)  # warm up
    engine_s, published, acked = _run(events, None)
    stage_s, _, _ = _run(events, raw)
    engine_rate = count / engine_s
    stage_rate = count / stage_s
    report(
        "incident",
        [
            (
                "events",
                f"{count}: 4 reports per incident from 3 nodes, 1 in 5 recovered; storm off",
            ),
            ("notifications", f"{published}; {acked} events acked at once (folded)"),
            ("engine alone", f"{engine_rate:,.0f} events/s"),
            ("decode + engine + encode", f"{stage_rate:,.0f} events/s (target {TARGET:,})"),
        ],
        {
            "events": count,
            "notifications": published,
            "acked_at_once": acked,
            "engine_events_per_s": round(engine_rate),
            "stage_events_per_s": round(stage_rate),
            "target_events_per_s": TARGET,
        },
    )
