"""The Pacemaker alert agent run by a real Pacemaker cluster (Debian's pacemaker and
corosync, tests/pacemaker_lab.py), with an alert of two recipients configured as the
README says, the agent run as hacluster, and real events: a resource started, failed
(crm_resource --fail), recovered and probed again (crm_resource --refresh), a node
attribute set and deleted, a node fenced through fence_dummy (stonith_admin), and a node
joining and leaving. A wrapper records the environment Pacemaker really passed to every
run, and the spool is checked against those records. A second alert without ``<select>``
(what pcs makes) shows which kinds Pacemaker sends such an alert.

It takes a while (real daemons start, elect a DC and settle after every step), so it is
marked ``cluster``: ``python -m pytest -m cluster`` runs it, after the main suite.
"""

from __future__ import annotations

import grp
import json
import os
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from producer.sources import PACEMAKER_EVENTS
from shared.catalog import load_catalog
from shared.placeholders import render_template
from tests.ha_agent import AGENT_GROUP, ROOT, agent_bin, lab_dir
from tests.pacemaker_lab import PacemakerLab, tree_contents
from tests.waiting import wait_until

__all__ = ["agent_bin", "lab_dir"]  # fixtures

pytestmark = pytest.mark.cluster

RECIPIENTS = ("ops", "oncall")  # as in the README
README_AGENT = "/usr/local/bin/clusteralert-alert"
# What differs between the runs of one alert for its recipients.
PER_RUN = ("CRM_alert_recipient", "CRM_alert_node_sequence")
# Variables that are not kept as params.
NOT_PARAMS = ("CRM_alert_timestamp",)


def alert_xml(agent: Path) -> str:
    """The README's cibadmin command (every kind, attributes included, two recipients),
    with the recorder for the agent's path."""
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("cibadmin --modify")]
    xml = command.split("'")[1]
    assert README_AGENT in xml
    return xml.replace(README_AGENT, str(agent))


DUMMY = (
    '<primitive id="dummy1" class="ocf" provider="pacemaker" type="Dummy"><operations>'
    '<op id="dummy1-monitor" name="monitor" interval="10s"/></operations></primitive>'
)
FENCE = (
    '<primitive id="fence-ghost" class="stonith" type="fence_dummy">'
    '<instance_attributes id="fence-ghost-ia">'
    '<nvpair id="fence-ghost-hosts" name="pcmk_host_list" value="ghost"/>'
    '<nvpair id="fence-ghost-type" name="type" value="file"/>'
    "</instance_attributes></primitive>"
)


class Recorder:
    """The alert path Pacemaker runs: records the CRM_alert_* environment, runs the
    installed agent, and records how it ended."""

    def __init__(self, directory: Path, agent: Path, config: Path):
        self.directory = directory / "alerts"
        self.directory.mkdir()
        self.directory.chmod(0o770)
        os.chown(self.directory, -1, grp.getgrnam(AGENT_GROUP).gr_gid)
        self.path = directory / "record-alert"
        self.path.write_text(
            textwrap.dedent(f"""\
                #!/bin/sh
                out={self.directory}/$$
                env -0 > "$out.env.tmp" && mv "$out.env.tmp" "$out.env"
                CLUSTERALERT_CONFIG={config} {agent} > "$out.out" 2> "$out.err"
                echo $? > "$out.rc.tmp" && mv "$out.rc.tmp" "$out.rc"
                """)
        )
        self.path.chmod(0o755)

    def runs(self) -> list[dict[str, str]]:
        """Every run so far: its CRM_alert_* variables, and _rc/_err once it ended."""
        found = []
        for env_file in sorted(self.directory.glob("*.env")):
            variables = dict(
                item.split("=", 1)
                for item in env_file.read_text().split("\0")
                if item.startswith("CRM_alert_")
            )
            rc_file = env_file.with_suffix(".rc")
            if rc_file.exists():
                variables["_rc"] = rc_file.read_text().strip()
                variables["_err"] = env_file.with_suffix(".err").read_text()
            found.append(variables)
        return found

    def has(self, **wanted: str) -> bool:
        """Both recipients' runs of an alert with these variables have ended."""
        matching = [
            run
            for run in self.runs()
            if "_rc" in run and all(run.get(f"CRM_alert_{k}") == v for k, v in wanted.items())
        ]
        return {run["CRM_alert_recipient"] for run in matching} >= set(RECIPIENTS)


def spool_events(spool: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(spool.glob("0*.json"))]


@pytest.fixture
def lab(lab_dir: Path) -> Iterator[PacemakerLab]:
    before = tree_contents(Path("/etc/corosync"))
    cluster = PacemakerLab(lab_dir / "cluster")
    try:
        yield cluster
    finally:
        print(cluster.logs())  # shown when the test fails
        cluster.close()
    assert tree_contents(Path("/etc/corosync")) == before, "/etc/corosync changed"


def test_one_event_per_alert_as_pacemaker_really_runs_the_agent(
    lab_dir: Path, agent_bin: Path, lab: PacemakerLab
) -> None:
    spool = lab_dir / "spool"
    spool.mkdir()
    spool.chmod(0o2770)  # as the README's install makes it: group haclient, setgid
    os.chown(spool, -1, grp.getgrnam(AGENT_GROUP).gr_gid)
    config = lab_dir / "clusteralert.toml"
    config.write_text(f'[producer]\nspool_dir = "{spool}"\ncluster = "lab"\n')
    config.chmod(0o644)
    recorder = Recorder(lab_dir, agent_bin / "clusteralert-pacemaker-alert", config)
    pcmk1, pcmk2 = lab.nodes

    lab.start_corosync(pcmk1)
    lab.start_pacemaker(pcmk1)
    pcmk1.run("crm_attribute", "-t", "crm_config", "-n", "stonith-enabled", "-v", "false")
    pcmk1.run(
        "cibadmin", "--modify", "--allow-create", "--scope", "configuration",
        "--xml-text", alert_xml(recorder.path),
    )  # fmt: skip
    # An alert without <select>, as pcs makes it: which kinds does Pacemaker send it?
    kinds = lab_dir / "kinds"
    kinds.touch()
    kinds.chmod(0o666)
    kinds_agent = lab_dir / "record-kind"
    kinds_agent.write_text(f'#!/bin/sh\necho "$CRM_alert_kind" >> {kinds}\n')
    kinds_agent.chmod(0o755)
    pcmk1.run(
        "cibadmin", "--create", "-o", "alerts", "--xml-text",
        f'<alert id="no-select" path="{kinds_agent}"><recipient id="no-select-r" value="r"/>'
        "</alert>",
    )  # fmt: skip

    # A node joins (its first join since the alert exists).
    lab.start_corosync(pcmk2)
    wait_until(lambda: recorder.has(kind="node", node="pcmk2", desc="member"), 120, "member")
    # A resource starts, fails, is recovered; a refresh probes it and finds it running.
    pcmk1.run("cibadmin", "--create", "-o", "resources", "--xml-text", DUMMY)
    wait_until(lambda: recorder.has(rsc="dummy1", task="start", rc="0"), 120, "dummy1 start")
    pcmk1.run("crm_resource", "--fail", "-r", "dummy1", "-N", "pcmk1")
    wait_until(lambda: recorder.has(rsc="dummy1", task="asyncmon", rc="1"), 120, "the failure")
    lab.wait_idle(pcmk1)
    pcmk1.run("crm_resource", "--refresh", "-r", "dummy1", "-N", "pcmk1")
    wait_until(
        lambda: recorder.has(rsc="dummy1", task="monitor", interval="0", rc="0", target_rc="7"),
        120,
        "the probe finding dummy1 running",
    )
    # A node attribute set, then deleted.
    pcmk1.run("attrd_updater", "-n", "clusteralert-test", "-U", "5")
    wait_until(
        lambda: recorder.has(attribute_name="clusteralert-test", attribute_value="5"), 120, "attr"
    )
    pcmk1.run("attrd_updater", "-n", "clusteralert-test", "-D")
    wait_until(
        lambda: recorder.has(attribute_name="clusteralert-test", attribute_value=""), 120, "del"
    )
    # A node fenced by a fence device.
    pcmk1.run("cibadmin", "--create", "-o", "resources", "--xml-text", FENCE)
    wait_until(lambda: recorder.has(rsc="fence-ghost", task="start"), 120, "fence device start")
    pcmk1.run("stonith_admin", "--reboot", "ghost", "--timeout", "60", timeout=120)
    wait_until(lambda: recorder.has(kind="fencing", node="ghost", rc="0"), 120, "fencing")
    # The node leaves.
    lab.stop_corosync(pcmk2)
    wait_until(lambda: recorder.has(kind="node", node="pcmk2", desc="lost"), 120, "lost")

    # A consistent picture: Pacemaker idle, every run ended, and no run started while the
    # spool was read.
    def settled() -> tuple[list[dict[str, str]], list[dict[str, Any]]] | None:
        lab.wait_idle(pcmk1)
        runs = recorder.runs()
        if any("_rc" not in run for run in runs):
            return None
        events = spool_events(spool)
        return (runs, events) if recorder.runs() == runs else None

    runs, events = wait_until(settled, 120, "the alerts to settle", interval=0.5)

    # What Pacemaker really passed: every alert once per recipient, with one time stamp
    # and a node_sequence of its own per run.
    alerts: dict[tuple[tuple[str, str], ...], list[dict[str, str]]] = defaultdict(list)
    for run in runs:
        assert (run["_rc"], run["_err"]) == ("0", ""), run
        key = tuple(
            sorted((k, v) for k, v in run.items() if k.startswith("CRM_") and k not in PER_RUN)
        )
        alerts[key].append(run)
    for group in alerts.values():
        assert sorted(run["CRM_alert_recipient"] for run in group) == sorted(RECIPIENTS), group
        assert len({run["CRM_alert_node_sequence"] for run in group}) == len(RECIPIENTS)
    cancelled = {"CRM_alert_kind": "resource", "CRM_alert_status": "1"}
    expected = [
        group[0]
        for group in alerts.values()
        if not all(group[0].get(k) == v for k, v in cancelled.items())
    ]

    # The spool: one event per alert (cancelled operations skipped), whatever the
    # number of recipients, each with the alert's variables as params.
    assert len(events) == len(expected), (len(events), len(expected))
    assert len({event["id"] for event in events}) == len(events)
    unmatched = list(events)
    for alert in expected:
        wanted = {
            k.removeprefix("CRM_alert_"): v
            for k, v in alert.items()
            if k.startswith("CRM_") and k not in PER_RUN and not k.startswith(NOT_PARAMS)
        }
        # The same operation can alert twice with the same variables but at another time:
        # the event's time is the alert's own (epoch and microseconds).
        when = (
            int(alert["CRM_alert_timestamp_epoch"]) + int(alert["CRM_alert_timestamp_usec"]) / 1e6
        )
        found = [
            e
            for e in unmatched
            if all(e["params"].get(k) == v for k, v in wanted.items())
            and abs(datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp() - when)
            < 0.001
        ]
        assert len(found) == 1, (alert, found)
        unmatched.remove(found[0])
    assert unmatched == []

    def the(**params: str) -> dict[str, Any]:
        (event,) = [e for e in events if all(e["params"].get(k) == v for k, v in params.items())]
        return event

    failed = {
        e["params"]["task"] for e in events if e["event_id"] == PACEMAKER_EVENTS["resource_failed"]
    }
    assert failed == {"asyncmon"}  # the injected failure, and nothing else
    assert the(task="asyncmon")["level"] == "error"
    probe = the(rsc="dummy1", task="monitor", interval="0", rc="0", target_rc="7")
    assert (probe["event_id"], probe["level"]) == (PACEMAKER_EVENTS["resource_ok"], "info")
    fenced = the(kind="fencing", node="ghost")
    assert fenced["event_id"] == PACEMAKER_EVENTS["fencing_ok"]
    assert fenced["params"]["action"] == "reboot"
    assert the(attribute_name="clusteralert-test", attribute_value="5")["event_id"] == 31
    assert the(attribute_name="clusteralert-test", attribute_value="")["event_id"] == 32
    assert the(kind="node", node="pcmk2", desc="member")["event_id"] == 2
    assert the(kind="node", node="pcmk2", desc="lost")["event_id"] == 1

    # The alert without <select> got every kind but attributes (the README says so).
    assert set(kinds.read_text().split()) == {"node", "resource", "fencing"}

    # Every text reads right.
    catalog = load_catalog([])
    for event in events:
        entry = catalog.lookup("pacemaker", event["event_id"])
        assert entry is not None
        text = render_template(entry.text, {"node": event["node"], **event["params"]})
        assert "?}" not in text and "st_notify" not in text and "again" not in text, text
        assert "(lost)" not in text and "is now ." not in text, text
