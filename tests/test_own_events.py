"""The pipeline's own events in unit: which events are ours, and a node's last-seen time
only ever moving forward, for a bounded number of nodes."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from shared.event import decode_event, encode_event, new_event
from shared.own_events import (
    canary_event,
    heartbeat_event,
    heartbeat_interval,
    own_kind,
    probe_event,
)
from worker.heartbeat import NodeHeartbeats
from worker.metrics import Metrics

SEEN = "clusteralert_node_last_seen_timestamp_seconds"


def test_our_events_survive_the_wire_and_are_told_apart() -> None:
    for event, kind in (
        (heartbeat_event("c1", "n1", 60), "heartbeat"),
        (canary_event(), "canary"),
        (probe_event(), "probe"),
    ):
        assert own_kind(decode_event(encode_event(event))) == kind
    # A cluster's own module of that name, or another event id under ours: ordinary.
    ordinary = new_event(module="clusteralert", event_id=9, cluster="c", node="n", source="cli")
    assert own_kind(ordinary) is None
    assert own_kind(replace(canary_event(), module="rm")) is None


def test_a_heartbeat_interval_that_is_no_positive_number_counts_as_none() -> None:
    event = heartbeat_event("c1", "n1", 30)
    assert heartbeat_interval(event) == 30
    for bad in ("", "x", "-5", "inf", "nan"):
        assert heartbeat_interval(replace(event, params={"interval": bad})) == 0


def test_last_seen_only_moves_forward() -> None:
    metrics = Metrics([])
    heartbeats = NodeHeartbeats(metrics)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    beat = replace(heartbeat_event("c1", "n1", 60), time=now)
    heartbeats.seen(beat)
    # An older heartbeat that waited in the queue arrives after a newer one.
    heartbeats.seen(replace(beat, time=now - timedelta(minutes=5)))
    labels = {"cluster": "c1", "node": "n1"}
    assert metrics.registry.get_sample_value(SEEN, labels) == now.timestamp()
    heartbeats.seen(replace(beat, time=now + timedelta(seconds=60)))
    assert metrics.registry.get_sample_value(SEEN, labels) == now.timestamp() + 60
    interval = "clusteralert_node_heartbeat_interval_seconds"
    assert metrics.registry.get_sample_value(interval, labels) == 60


def test_a_heartbeat_from_the_future_counts_as_received_now() -> None:
    """A node's clock a year ahead (or a forged heartbeat) must not pin its last-seen
    time in the future, which would keep the node-silent alert off for a year."""
    metrics = Metrics([])
    heartbeats = NodeHeartbeats(metrics)
    labels = {"cluster": "c1", "node": "n1"}
    beat = heartbeat_event("c1", "n1", 60)
    before = time.time()
    heartbeats.seen(replace(beat, time=datetime.now(UTC) + timedelta(days=365)))
    seen = metrics.registry.get_sample_value(SEEN, labels)
    assert seen is not None and before <= seen <= time.time()
    # Nor does the next one from that clock: each counts as no later than its arrival.
    heartbeats.seen(replace(beat, time=datetime.now(UTC) + timedelta(days=366)))
    assert seen <= (metrics.registry.get_sample_value(SEEN, labels) or 0) <= time.time()


def test_the_number_of_nodes_is_bounded() -> None:
    metrics = Metrics([])
    heartbeats = NodeHeartbeats(metrics, max_nodes=2)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    for node in ("n1", "n2", "n3"):
        heartbeats.seen(replace(heartbeat_event("c1", node, 60), time=hour_ago))
    seen = {
        s.labels["node"]
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == SEEN
    }
    assert seen == {"n1", "n2"}
    # A tracked node still moves on.
    heartbeats.seen(heartbeat_event("c1", "n1", 60))
    assert (
        metrics.registry.get_sample_value(SEEN, {"cluster": "c1", "node": "n1"})
        > hour_ago.timestamp()
    )
