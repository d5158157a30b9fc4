"""Node heartbeats against a real RabbitMQ and real processes: two node agents
(``clusteralert-producer run``) beat every second; when one stops, its last-seen time on
the active stage stops while the other's goes on, and no heartbeat is ever mailed. While
the broker is away, heartbeats are not spooled."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Certs, Process, free_port, scrape
from tests.pipeline import run_cli, start_worker, write_config
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

SEEN = "clusteralert_node_last_seen_timestamp_seconds"
INTERVAL = "clusteralert_node_heartbeat_interval_seconds"


def _seen(port: int, node: str) -> float:
    return scrape(port).get(f'{SEEN}{{cluster="prod-cluster",node="{node}"}}', 0.0)


def test_a_stopped_agent_falls_silent_while_the_other_beats_on(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls")
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    _, port = start_worker(processes, config)
    agents = {}
    for node in ("node-a", "node-b"):
        # Each node agent has its own spool and name; the rest is the shared file.
        text = config.read_text().replace(
            'spool_dir = "spool"',
            f'spool_dir = "spool-{node}"\nnode = "{node}"\nheartbeat_interval = 1',
        )
        node_config = tmp_path / f"{node}.toml"
        node_config.write_text(text)
        agents[node] = processes("clusteralert-producer", "run", "--config", str(node_config))

    for node in agents:
        first = wait_until(lambda n=node: _seen(port, n) or None, 30, f"a heartbeat of {node}")
        wait_until(lambda n=node, f=first: _seen(port, n) > f, 30, f"a second heartbeat of {node}")
    assert scrape(port)[f'{INTERVAL}{{cluster="prod-cluster",node="node-a"}}'] == 1

    assert agents["node-a"].stop() == 0
    stopped = _seen(port, "node-a")
    last_b = _seen(port, "node-b")
    # Three more beats of node-b, and node-a stands still meanwhile.
    for _ in range(3):
        last_b = wait_until(
            lambda b=last_b: v if (v := _seen(port, "node-b")) > b else None,
            30,
            "node-b beating on",
        )
    assert _seen(port, "node-a") == stopped
    assert last_b - stopped >= 2
    assert relay.received == []


def test_heartbeats_never_fill_the_spool_while_the_broker_is_away(
    tmp_path: Path, processes: Callable[..., Process]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"""
[broker]
urls = ["amqp://guest:guest@127.0.0.1:{free_port()}/%2F"]
[producer]
spool_dir = "spool"
heartbeat_interval = 1
""")
    processes("clusteralert-producer", "run", "--config", str(config))

    def status() -> dict[str, object]:
        result = run_cli("clusteralert-producer", "status", "--json", "--config", str(config))
        assert result.returncode == 0, result.stderr
        report: dict[str, object] = json.loads(result.stdout)
        return report

    # Three failed connection attempts (backoff 0.5, 1, 2 s): a heartbeat due every second.
    errors: set[object] = set()
    wait_until(
        lambda: errors.add(status()["last_error_time"]) or len(errors - {None}) >= 3,
        30,
        "three failed connection attempts",
    )
    assert status()["events"] == 0
    assert not list((tmp_path / "spool").glob("*.json"))
