"""Promises of the worker's command line, checked on the real process: SIGTERM returns
what it cannot finish within ``shutdown_grace``, ``--log-format json``, one log line per
outcome, and the ``dlq`` filters ``--since`` and ``--limit``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import Certs, Process, free_port, wait_metric
from tests.pipeline import (
    dlq,
    dlq_list,
    publish_events,
    queue_depth,
    received_ids,
    start_worker,
    write_config,
)
from tests.smtpserver import SmtpServer

pytestmark = pytest.mark.integration

Servers = Callable[..., SmtpServer]
Processes = Callable[..., Process]


def test_sigterm_returns_an_unfinished_mail_once_shutdown_grace_runs_out(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls")
    relay.handler.data_delay = 10.0  # the relay sits on the mail far past the grace
    config = write_config(
        tmp_path, vhost, [relay], certs, auth=False, extra="[worker]\nshutdown_grace = 1\n"
    )
    worker, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    wait_metric(port, "clusteralert_in_flight", lambda v: v == 1, 30)
    started = time.monotonic()
    assert worker.stop(timeout=20) == 0
    elapsed = time.monotonic() - started
    # The grace (1 s), not the relay's 10 s, decided when the worker left.
    assert elapsed < 6, elapsed
    assert "shutting down" in worker.output()
    # Cancelled, not acked: the message is back on the queue for the next worker.
    assert queue_depth(vhost) == 1
    assert event_id not in received_ids(relay)


FILTERS = '[filter]\nmin_level = "warning"\n'


def test_json_logs_have_one_line_per_outcome(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls")
    config = write_config(tmp_path, vhost, [relay], certs, auth=False, extra=FILTERS)
    port = free_port()
    worker = processes(
        "clusteralert-worker",
        "run",
        "--config",
        str(config),
        "--metrics-port",
        str(port),
        "--log-format",
        "json",
    )
    wait_metric(port, "clusteralert_broker_connected", lambda v: v == 1, 30)
    # node:2 first: after node:1 it would end node:1's incident of the same server, and
    # its recovery would be mailed.
    filtered = publish_events(vhost, 2, event_id=2)  # node:2, info: below min_level
    sent = publish_events(vhost, 2)  # node:1, an error: mailed
    wait_metric(port, "clusteralert_events_consumed_total", lambda v: v == 4, 30)
    wait_metric(port, "clusteralert_in_flight", lambda v: v == 0, 30)
    assert sorted(received_ids(relay)) == sorted(sent)
    assert worker.stop() == 0

    records = [json.loads(line) for line in worker.output().splitlines() if line.strip()]
    assert records, "no log output"
    for record in records:  # every line is one JSON object with the documented fields
        assert {"time", "level", "logger", "message"} <= set(record), record
    for event_id in sent + filtered:
        lines = [r["message"] for r in records if event_id in r["message"]]
        assert len(lines) == 1, (event_id, lines)
        [line] = lines
        assert line.startswith("sent event" if event_id in sent else "filtered event"), line
        assert "node:" in line


def test_dlq_since_and_limit_pick_what_they_say(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls")
    relay.handler.data_replies = ["550 5.7.1 refused"] * 5
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    _, port = start_worker(processes, config)
    old = publish_events(vhost, 2, age=timedelta(hours=3))
    new = publish_events(vhost, 3, age=timedelta(minutes=5))
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 5, 30
    )
    assert sorted(r["id"] for r in dlq_list(config)) == sorted(old + new)

    recent = dlq(config, "list", "--since", "1h", "--json")
    assert recent.returncode == 0, recent.stderr
    assert sorted(r["id"] for r in json.loads(recent.stdout)) == sorted(new)
    limited = dlq(config, "list", "--since", "1h", "--limit", "2", "--json")
    assert limited.returncode == 0, limited.stderr
    picked = [r["id"] for r in json.loads(limited.stdout)]
    assert len(picked) == 2 and set(picked) <= set(new)

    # Replay acts on the same selection: one recent dead letter, and no other.
    replay = dlq(config, "replay", "--since", "1h", "--limit", "1")
    assert replay.returncode == 0, replay.stderr
    assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
    [replayed] = received_ids(relay)
    assert replayed in new
    left = sorted(r["id"] for r in dlq_list(config))
    assert left == sorted(set(old + new) - {replayed})
