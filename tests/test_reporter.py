"""The ``reporter`` field: who spooled an event, besides ``node``, whom it is about."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from producer.cli import main
from producer.follow import LogFollower
from producer.sources import keepalived_event, pacemaker_event
from producer.spool import Spool
from shared.catalog import Catalog
from shared.config import FollowConfig
from shared.errors import InvalidEvent
from shared.event import decode_event, encode_event, new_event
from tests.test_emit_cli import emit


def test_reporter_travels_and_an_event_without_one_counts_as_its_node() -> None:
    event = new_event(module="rm", event_id=9, cluster="c", node="n3", source="cli", reporter="n1")
    doc = json.loads(encode_event(event))
    assert doc["reporter"] == "n1" and doc["node"] == "n3" and doc["v"] == 1
    assert decode_event(encode_event(event)) == event
    assert event.reported_by == "n1"
    del doc["reporter"]
    old = decode_event(json.dumps(doc).encode())
    assert old.reporter is None and old.reported_by == "n3"
    assert b"reporter" not in encode_event(old)


def test_reporter_is_cleaned_and_bounded_like_node() -> None:
    dirty = new_event(
        module="rm", event_id=9, cluster="c", node="n", source="cli", reporter="a\r\nb" + "x" * 400
    )
    assert dirty.reporter is not None
    assert "\r" not in dirty.reporter and "\n" not in dirty.reporter
    assert dirty.reporter.startswith("a\\r\\nb") and len(dirty.reporter) == 255
    doc = json.loads(encode_event(dirty))
    doc["reporter"] = 7
    with pytest.raises(InvalidEvent, match=r"^reporter: expected str, got int$"):
        decode_event(json.dumps(doc).encode())


def test_emit_node_sets_only_the_node_and_the_reporter_is_this_node(tmp_path: Path) -> None:
    config = tmp_path / "producer.toml"
    spool = tmp_path / "spool"
    result = emit(tmp_path, "--module", "rm", "--event-id", "9", "--node", "n3")
    assert result.returncode == 0, result.stderr
    # emit() writes a config without [producer] node: the reporter is the host name.
    [doc] = [json.loads(p.read_bytes()) for p in spool.glob("*.json")]
    assert doc["node"] == "n3" and doc["reporter"] == os.uname().nodename
    config.write_text(f'[producer]\nspool_dir = "{spool}"\nnode = "here"\n')
    for path in spool.glob("*.json"):
        path.unlink()
    assert main(["emit", "--config", str(config), "--module", "rm", "--event-id", "9"]) == 0
    [doc] = [json.loads(p.read_bytes()) for p in spool.glob("*.json")]
    assert doc["node"] == "here" and doc["reporter"] == "here"


def test_pacemaker_node_is_the_alert_node_and_reporter_this_node() -> None:
    env = {
        "CRM_alert_kind": "node",
        "CRM_alert_node": "node3",
        "CRM_alert_desc": "lost",
        "CRM_alert_timestamp_epoch": "1700000000",
        "CRM_alert_timestamp_usec": "5",
    }
    one = pacemaker_event(env, cluster="c", fallback_node="node1")
    two = pacemaker_event(env, cluster="c", fallback_node="node2")
    assert one is not None and two is not None
    assert (one.node, one.reporter) == ("node3", "node1")
    assert (two.node, two.reporter) == ("node3", "node2")
    # Two nodes' reports are two events, even with the same time stamp; one node's
    # runs for several recipients are still one.
    assert one.id != two.id
    again = pacemaker_event(env, cluster="c", fallback_node="node1")
    assert again is not None and again.id == one.id


def test_keepalived_reporter_is_this_node() -> None:
    event = keepalived_event(["INSTANCE", "VI_1", "FAULT"], cluster="c", node="lb1")
    assert event.node == "lb1" and event.reporter == "lb1"


def test_follower_node_is_the_line_host_and_reporter_this_agent(tmp_path: Path) -> None:
    log = tmp_path / "messages"
    log.write_text("")
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    follower = LogFollower(FollowConfig(log), spool, Catalog(), cluster="c", node="collector")
    assert follower.poll() == 0
    with log.open("a") as fh:
        fh.write("Nov 26 03:00:01 db2 clusterpro: <type: nm><event: 2> Server db1 down.\n")
    assert follower.poll() == 1
    [doc] = [json.loads(p.read_bytes()) for p in spool.pending()]
    assert doc["node"] == "db2" and doc["reporter"] == "collector"
