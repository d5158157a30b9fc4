"""Pacemaker and keepalived sources: table-driven from real alert environments, and
through the real agent command to the event on the broker."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from producer.sources import keepalived_event, pacemaker_event
from shared.catalog import load_catalog
from shared.errors import InvalidEvent
from shared.placeholders import render_template
from tests.conftest import BIN, Process, amqp_url
from tests.pipeline import take_messages
from tests.waiting import wait_until

BASE = {
    "CRM_alert_version": "2.1.5",
    "CRM_alert_recipient": "ops@example.com",
    "CRM_alert_node_sequence": "17",
    "CRM_alert_timestamp": "2026-11-26 03:00:00.123456",
    "CRM_alert_timestamp_epoch": "1795662000",
    "CRM_alert_timestamp_usec": "123456",
}

# (name, CRM_alert_* variables, expected event_id, level) -- None: skipped
CASES = [
    ("node lost", {"kind": "node", "node": "node2", "nodeid": "2", "desc": "lost"}, 1, "error"),
    ("node member", {"kind": "node", "node": "node2", "nodeid": "2", "desc": "member"}, 2, "info"),
    (
        "fencing ok",
        {
            "kind": "fencing",
            "node": "node2",
            "task": "reboot",
            "rc": "0",
            "desc": "Operation reboot of node2 by node1 for pacemaker-controld: OK",
        },
        11,
        "warning",
    ),
    (
        "fencing failed",
        {
            "kind": "fencing",
            "node": "node2",
            "task": "reboot",
            "rc": "-62",
            "desc": "Operation reboot of node2 by node1: Timer expired",
        },
        12,
        "error",
    ),
    (
        "monitor failed",
        {
            "kind": "resource",
            "node": "node1",
            "rsc": "httpd",
            "task": "monitor",
            "interval": "10000",
            "rc": "7",
            "target_rc": "0",
            "status": "0",
            "desc": "not running",
            "exec_time": "12",
        },
        22,
        "error",
    ),
    (
        "start timed out",
        {
            "kind": "resource",
            "node": "node1",
            "rsc": "db",
            "task": "start",
            "interval": "0",
            "rc": "1",
            "target_rc": "0",
            "status": "2",
            "desc": "Timed Out",
        },
        22,
        "error",
    ),
    (
        "start ok",
        {
            "kind": "resource",
            "node": "node1",
            "rsc": "db",
            "task": "start",
            "interval": "0",
            "rc": "0",
            "target_rc": "0",
            "status": "0",
            "desc": "ok",
        },
        21,
        "info",
    ),
    (
        "probe as expected",
        {
            "kind": "resource",
            "node": "node1",
            "rsc": "db",
            "task": "monitor",
            "interval": "0",
            "rc": "7",
            "target_rc": "7",
            "status": "0",
            "desc": "not running",
        },
        21,
        "info",
    ),
    (
        "cancelled",
        {
            "kind": "resource",
            "node": "node1",
            "rsc": "db",
            "task": "monitor",
            "interval": "10000",
            "rc": "0",
            "target_rc": "0",
            "status": "1",
            "desc": "Cancelled",
        },
        None,
        None,
    ),
    (
        "attribute",
        {
            "kind": "attribute",
            "node": "node1",
            "attribute_name": "master-db",
            "attribute_value": "10",
        },
        31,
        "info",
    ),
    (
        "probe finds it running",  # after crm_resource --refresh: not a failure
        {
            "kind": "resource",
            "node": "pcmk1",
            "rsc": "dummy1",
            "task": "monitor",
            "interval": "0",
            "rc": "0",
            "target_rc": "7",
            "status": "0",
            "desc": "ok",
            "exec_time": "19",
        },
        21,
        "info",
    ),
    (
        "probe finds it promoted",
        {
            "kind": "resource",
            "node": "pcmk1",
            "rsc": "db",
            "task": "monitor",
            "interval": "0",
            "rc": "8",
            "target_rc": "7",
            "status": "0",
            "desc": "promoted",
        },
        21,
        "info",
    ),
    (
        "probe fails",
        {
            "kind": "resource",
            "node": "pcmk1",
            "rsc": "db",
            "task": "monitor",
            "interval": "0",
            "rc": "1",
            "target_rc": "7",
            "status": "0",
            "desc": "error",
        },
        22,
        "error",
    ),
    (
        "probe timed out",
        {
            "kind": "resource",
            "node": "pcmk1",
            "rsc": "db",
            "task": "monitor",
            "interval": "0",
            "rc": "0",
            "target_rc": "7",
            "status": "2",
            "desc": "Timed Out",
        },
        22,
        "error",
    ),
    (
        "recurring monitor finds it promoted",
        {
            "kind": "resource",
            "node": "pcmk1",
            "rsc": "db",
            "task": "monitor",
            "interval": "10000",
            "rc": "8",
            "target_rc": "0",
            "status": "0",
            "desc": "promoted",
        },
        22,
        "error",
    ),
    (
        "attribute deleted",  # attrd_updater -D: the name with an empty value
        {"kind": "attribute", "node": "pcmk1", "attribute_name": "ca-test", "attribute_value": ""},
        32,
        "info",
    ),
    ("future kind", {"kind": "quorum", "node": "node1", "desc": "lost quorum"}, 99, "warning"),
]


def env_for(values: dict[str, str], **extra: str) -> dict[str, str]:
    return {**BASE, **{f"CRM_alert_{k}": v for k, v in {**values, **extra}.items()}}


@pytest.mark.parametrize(("name", "values", "event_id", "level"), CASES, ids=[c[0] for c in CASES])
def test_pacemaker_alerts_map_to_events(
    name: str, values: dict[str, str], event_id: int | None, level: str | None
) -> None:
    event = pacemaker_event(env_for(values), cluster="c1", fallback_node="here")
    if event_id is None:
        assert event is None
        return
    assert event is not None
    assert (event.module, event.event_id, event.level) == ("pacemaker", event_id, level)
    assert event.node == values["node"]
    assert event.params["recipient"] == "ops@example.com"  # kept for the mail only
    assert event.params["kind"] == values["kind"]
    assert event.time.isoformat() == "2026-11-26T03:00:00.123456+00:00"
    assert event.source == "pacemaker"
    # The shipped catalog describes every outcome, using only params the alert has.
    entry = load_catalog([]).lookup("pacemaker", event_id)
    assert entry is not None


# One alert to two recipients, as Pacemaker 2.1.5 really ran the agent (recorded by a
# wrapper): one time stamp, but node_sequence incremented for every run.
REAL_RUNS = [
    {
        "CRM_alert_desc": "error",
        "CRM_alert_exec_time": "0",
        "CRM_alert_interval": "0",
        "CRM_alert_kind": "resource",
        "CRM_alert_node": "pcmk1",
        "CRM_alert_node_sequence": sequence,
        "CRM_alert_rc": "1",
        "CRM_alert_recipient": recipient,
        "CRM_alert_rsc": "dummy1",
        "CRM_alert_status": "0",
        "CRM_alert_target_rc": "0",
        "CRM_alert_task": "asyncmon",
        "CRM_alert_timestamp": "15:20:08.671327",
        "CRM_alert_timestamp_epoch": "1795792808",
        "CRM_alert_timestamp_usec": "671327",
        "CRM_alert_version": "2.1.5",
    }
    for sequence, recipient in (("1", "ops2"), ("2", "ops1"))
]


def test_every_recipient_run_of_one_alert_gives_the_same_event_id() -> None:
    first, second = (pacemaker_event(env, cluster="c", fallback_node="n") for env in REAL_RUNS)
    # The same failure again a moment later is another alert.
    later = pacemaker_event(
        {**REAL_RUNS[0], "CRM_alert_node_sequence": "3", "CRM_alert_timestamp_usec": "703327"},
        cluster="c",
        fallback_node="n",
    )
    assert first is not None and second is not None and later is not None
    assert first.id == second.id
    assert later.id != first.id
    # Pacemaker 1.1 has no epoch variables: the formatted time stamp tells alerts apart.
    old = [
        {k: v for k, v in env.items() if not k.startswith("CRM_alert_timestamp_")}
        for env in REAL_RUNS
    ]
    ids = {pacemaker_event(env, cluster="c", fallback_node="n").id for env in old}
    assert len(ids) == 1


def render(event_env: dict[str, str]) -> str:
    """The mail text the shipped catalog gives the alert."""
    event = pacemaker_event(event_env, cluster="c", fallback_node="n")
    assert event is not None
    entry = load_catalog([]).lookup(event.module, event.event_id)
    assert entry is not None
    return render_template(entry.text, {"node": event.node, **event.params})


def test_texts_say_what_happened() -> None:
    assert render(env_for(CASES[0][1])) == "Cluster node node2 was lost."
    member = render(env_for(CASES[1][1]))
    assert member == "Cluster node node2 is a member of the cluster."  # first join or not
    # A real fencing alert: the task is the notification type, the action is in desc.
    fenced = render(
        env_for(
            {
                "kind": "fencing",
                "node": "ghost",
                "task": "st_notify_fence",
                "rc": "0",
                "desc": "Operation reboot of ghost by pcmk1 for stonith_admin.24347@pcmk1: OK "
                "(ref=de049d34-5b4f-48e1-a906-5b124c074c26)",
            }
        )
    )
    assert fenced.startswith("Node ghost was fenced (reboot): Operation reboot of ghost by pcmk1")
    assert "st_notify" not in fenced
    deleted = render(
        env_for(
            {
                "kind": "attribute",
                "node": "pcmk1",
                "nodeid": "1",
                "attribute_name": "ca-test",
                "attribute_value": "",
            }
        )
    )
    assert deleted == "Node attribute ca-test on pcmk1 was deleted."


def test_not_run_by_pacemaker_is_a_clear_error() -> None:
    with pytest.raises(InvalidEvent, match="CRM_alert_kind is not set"):
        pacemaker_event({}, cluster="c", fallback_node="n")


@pytest.mark.parametrize(
    ("state", "event_id", "level"),
    [
        ("MASTER", 1, "warning"),
        ("BACKUP", 2, "info"),
        ("FAULT", 3, "error"),
        ("STOP", 4, "warning"),
        # Removed by a reload, reported so with notify_deleted (otherwise as FAULT).
        ("DELETED", 5, "warning"),
        ("SOMETHING_NEW", 9, "warning"),
    ],
)
def test_keepalived_states(state: str, event_id: int, level: str) -> None:
    event = keepalived_event(["INSTANCE", "VI_1", state, "100"], cluster="c", node="lb1")
    assert (event.module, event.event_id, event.level) == ("keepalived", event_id, level)
    assert event.params == {"type": "INSTANCE", "name": "VI_1", "state": state, "priority": "100"}
    assert load_catalog([]).lookup("keepalived", event_id) is not None


@pytest.mark.integration
def test_the_pacemaker_agent_spools_once_per_alert_and_reaches_the_broker(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    from shared.config import parse_config
    from worker.broker import connect_any, declare_topology

    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[broker]\nurls = ["{amqp_url(vhost)}"]\n'
        f'[producer]\nspool_dir = "{tmp_path / "spool"}"\ncluster = "prod"\n'
        "heartbeat_interval = 0\n"  # the queue must hold the fencing event alone
    )
    env = {**os.environ, "CLUSTERALERT_CONFIG": str(config)}
    fencing = CASES[3][1]
    # Pacemaker runs the agent once per recipient, with no arguments, in parallel, and
    # gives every run a node_sequence of its own.
    runs = [
        subprocess.Popen(
            [str(BIN / "clusteralert-pacemaker-alert")],
            env={**env, **env_for(fencing, recipient=r, node_sequence=str(17 + i))},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, r in enumerate(("a@example.com", "b@example.com", "c@example.com"))
    ]
    outputs = [run.communicate(timeout=30) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert len({out for out, _ in outputs}) == 1  # one event id
    assert len(list((tmp_path / "spool").glob("0*.json"))) == 1

    producer = processes("clusteralert-producer", "run", "--config", str(config))
    params = pika.URLParameters(amqp_url(vhost))

    def queued() -> int:
        with pika.BlockingConnection(params) as conn:
            declared = conn.channel().queue_declare("clusteralert.incoming", passive=True)
            return int(declared.method.message_count)

    wait_until(lambda: queued() == 1, 20, "the fencing event on the incoming queue")
    [(method, properties, body)] = take_messages(vhost)
    doc = json.loads(body)
    assert method.routing_key == "pacemaker.12.node2"
    assert (doc["module"], doc["event_id"], doc["level"], doc["cluster"]) == (
        "pacemaker",
        12,
        "error",
        "prod",
    )
    assert doc["params"]["desc"] == fencing["desc"]
    assert producer.stop() == 0
