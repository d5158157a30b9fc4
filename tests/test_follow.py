"""Log followers: matching lines become events exactly once, across rotation,
truncation and restarts; junk never crashes them."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from producer.follow import LogFollower, catalog_regex
from producer.spool import Spool
from shared.catalog import Catalog, CatalogEntry
from shared.config import CLUSTERPRO_PATTERN, FollowConfig, parse_config
from tests.conftest import Process, amqp_url
from tests.waiting import wait_until

CATALOG = Catalog(
    [
        CatalogEntry("rm", 9, "error", True, "Detected an error in monitoring {1}. ({2} : {3})"),
        CatalogEntry("nm", 1, "error", True, "Server %1 has been stopped."),
    ]
)


class Node:
    def __init__(self, tmp_path: Path):
        self.log = tmp_path / "messages"
        self.log.write_text("")
        self.spool = Spool(tmp_path / "spool")
        self.spool.ensure()
        self.follower = self.new_follower()

    def new_follower(self) -> LogFollower:
        return LogFollower(FollowConfig(self.log), self.spool, CATALOG, cluster="c", node="n1")

    def append(self, *lines: str | bytes, path: Path | None = None) -> None:
        with (path or self.log).open("ab") as fh:
            for line in lines:
                fh.write((line.encode() if isinstance(line, str) else line) + b"\n")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(p.read_bytes()) for p in self.spool.pending()]


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def test_history_is_skipped_then_new_lines_become_events(node: Node) -> None:
    node.append("<type: rm><event: 9> old news")
    node.follower = node.new_follower()
    assert node.follower.poll() == 0  # first start: begin at the end
    node.append(
        "Nov 26 03:00:01 n1 clusterpro: <type: rm><event: 9> Detected an error in monitoring "
        "httpw. (11 : timeout)",
        "Nov 26 03:00:02 n1 sshd[1]: unrelated line",
        "Nov 26 03:00:03 n1 clusterpro: <type: nm><event: 1> Server db2 has been stopped.",
        "Nov 26 03:00:04 n1 clusterpro: <type: rm><event: 77> something new entirely",
    )
    assert node.follower.poll() == 3
    events = node.events()
    assert [(e["module"], e["event_id"]) for e in events] == [("rm", 9), ("nm", 1), ("rm", 77)]
    assert events[0]["params"] == {"1": "httpw", "2": "11", "3": "timeout"}
    assert events[1]["params"] == {"1": "db2"}
    assert events[2]["params"] == {} and events[2]["text"] == "something new entirely"
    assert all(e["source"] == "log" and e["node"] == "n1" for e in events)


def test_rotation_truncation_and_restart_send_each_line_once(node: Node) -> None:
    node.follower.poll()
    node.append("<type: rm><event: 1> a")
    node.follower.poll()
    # Rotation: the old file gets a last line after the rename, then a new file appears.
    rotated = node.log.with_suffix(".1")
    os.rename(node.log, rotated)
    node.append("<type: rm><event: 2> b", path=rotated)
    node.append("<type: rm><event: 3> c")
    node.follower.poll()
    # Restart: lines written while the follower is down are read once it is back.
    node.follower.close()
    node.append("<type: rm><event: 4> d")
    node.follower = node.new_follower()
    node.follower.poll()
    node.follower.poll()
    # copytruncate: the file is emptied in place.
    with node.log.open("r+b") as fh:
        fh.truncate(0)
    node.append("<type: rm><event: 5> e")
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2, 3, 4, 5]


def test_a_line_spooled_before_a_crash_is_not_spooled_again(node: Node) -> None:
    node.follower.poll()
    node.append("<type: rm><event: 1> a")
    node.follower.poll()
    state = next((node.spool.directory / ".follow").glob("*.json"))
    saved = json.loads(state.read_text())
    node.follower.close()
    # The crash came after spooling but before the position was saved.
    empty_tail = hashlib.sha256(b"").hexdigest()[:16]  # the fingerprint at offset 0
    state.write_text(json.dumps({**saved, "offset": 0, "tail": empty_tail}))
    node.follower = node.new_follower()
    node.follower.poll()
    assert len(node.events()) == 1


def test_pathological_lines_do_not_crash_the_follower(node: Node) -> None:
    node.follower.poll()
    node.append(b"<type: rm><event: 1> " + b"x" * 2_000_000)
    node.append(b"<type: rm><event: 2> bad \xff\xfe utf-8 \x1b[31m")
    node.append(b"<type: rm><event: 99999999999999999999999> too big")
    node.append(b"<type: rm><event: 3> fine")
    for _ in range(4):  # each poll reads at most 1 MiB, to keep the I/O loop responsive
        node.follower.poll()
    events = node.events()
    assert [e["event_id"] for e in events] == [1, 2, 3]
    assert len(json.dumps(events[0]).encode()) < 64 * 1024
    assert events[1]["text"] == "bad \ufffd\ufffd utf-8 \\x1b[31m"


def test_a_failed_spool_write_loses_no_line_and_repeats_none(node: Node) -> None:
    node.follower.poll()
    node.append(*(f"<type: rm><event: {i}> line {i}" for i in range(1, 7)))
    real_write_once = node.spool.write_once
    calls = 0

    def flaky(event):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            from shared.errors import SpoolError

            raise SpoolError("spool is full")
        return real_write_once(event)

    node.spool.write_once = flaky  # type: ignore[method-assign]
    with pytest.raises(Exception, match="spool is full"):
        node.follower.poll()
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2, 3, 4, 5, 6]


def test_truncation_while_the_agent_was_down_keeps_new_lines(node: Node) -> None:
    node.follower.poll()
    node.append("<type: rm><event: 1> before")
    node.follower.poll()
    node.follower.close()
    with node.log.open("r+b") as fh:
        fh.truncate(0)
    node.append("<type: rm><event: 2> after, at the same offset")
    node.follower = node.new_follower()
    node.follower.poll()
    assert [e["event_id"] for e in node.events()] == [1, 2]


def test_catalog_regex_handles_positional_and_named_placeholders() -> None:
    regex = catalog_regex("Monitor {monitor} failed on %1 (%1)")
    assert regex is not None
    match = regex.fullmatch("Monitor httpw failed on n1 (n1)")
    assert match is not None and match.groupdict() == {"monitor": "httpw", "p1": "n1"}
    assert catalog_regex("no placeholders") is None


def test_follower_config_is_validated(tmp_path: Path) -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "producer": {
                    "follow": [
                        {"path": "/var/log/x", "patterns": ["(unclosed"]},
                        {"path": "/var/log/y", "patterns": ["no groups here"]},
                    ]
                }
            },
            sections=("producer",),
            base=tmp_path,
        )
    found = [str(p) for p in info.value.problems]
    assert any(
        p.startswith("producer.follow[0].patterns[0]: not a valid regular expression")
        for p in found
    )
    assert any("producer.follow[1].patterns[0]: has no (?P<module>...) group" in p for p in found)
    config = parse_config(
        {"producer": {"follow": [{"path": "log"}]}}, sections=("producer",), base=tmp_path
    )
    assert config.producer.follow[0].patterns == (CLUSTERPRO_PATTERN,)
    assert config.producer.follow[0].path == tmp_path / "log"


@pytest.mark.integration
def test_run_follows_a_log_across_rotation_and_restart_to_the_broker(
    tmp_path: Path, vhost: str, processes: Callable[..., Process]
) -> None:
    from worker.consume import connect_any
    from worker.declare import declare_topology

    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)
    log = tmp_path / "messages"
    log.write_text("<type: rm><event: 1> history, not sent\n")
    config = tmp_path / "node.toml"
    config.write_text(
        f'[broker]\nurls = ["{amqp_url(vhost)}"]\n'
        f'[producer]\nspool_dir = "{tmp_path / "spool"}"\n'
        f'[[producer.follow]]\npath = "{log}"\n'
    )
    state_dir = tmp_path / "spool" / ".follow"

    def append(path: Path, line: str) -> None:
        with path.open("a") as fh:
            fh.write(line + "\n")

    def queued_ids() -> list[int]:
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as conn:
            channel = conn.channel()
            found = []
            while True:
                method, _, body = channel.basic_get("clusteralert.mail", auto_ack=False)
                if method is None:
                    return found
                found.append(json.loads(body)["event_id"])

    agent = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(lambda: any(state_dir.glob("*.json")), 20, "the follower to start")
    append(log, "<type: rm><event: 2> first")
    append(log, "noise")
    os.rename(log, log.with_suffix(".1"))
    append(log.with_suffix(".1"), "<type: rm><event: 3> written just after rotation")
    append(log, "<type: rm><event: 4> in the new file")
    wait_until(lambda: len(queued_ids()) == 3, 20, "three events")
    assert agent.stop() == 0
    append(log, "<type: rm><event: 5> while the agent was down")
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(lambda: len(queued_ids()) == 4, 20, "the fourth event")
    assert sorted(queued_ids()) == [2, 3, 4, 5]
    assert agent.stop() == 0
