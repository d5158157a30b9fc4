"""Silences end to end: real RabbitMQ (the silences stream), real ``clusteralert-worker``
processes, the ``silence`` commands as an operator runs them, and a real TLS relay."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika

from shared.silence import HeldRow, Record, Silence, encode_record, held_record, sync_record
from tests.conftest import Certs, Process, amqp_url, scrape, wait_metric
from tests.pipeline import SMTP_PASSWORD, run_cli, start_worker, write_config
from tests.smtpserver import Received, SmtpServer
from tests.waiting import wait_until

SILENCED = "clusteralert_events_silenced_total"


def _publish(vhost: str, node: str, *, number: int = 1, monitor: str | None = None) -> str:
    """One monitor event about ``node`` (1: failure, 2: recovery), as a producer
    publishes it, confirmed."""
    event_id = str(uuid.uuid4())
    event = {
        "v": 1,
        "id": event_id,
        "time": datetime.now(UTC).isoformat(),
        "cluster": "c",
        "node": node,
        "module": "monitor",
        "event_id": number,
        # By default a new monitor each time: every event is an incident of its own.
        "params": {"monitor": monitor or f"mon-{event_id[:8]}", "detail": "unhealthy"},
        "source": "test",
    }
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "clusteralert.events",
            f"monitor.{number}.{node}",
            json.dumps(event).encode(),
            mandatory=True,
            properties=pika.BasicProperties(delivery_mode=2, message_id=event_id),
        )
    return event_id


def _fill_stream(vhost: str, records: int) -> None:
    """Records of no silence ahead of the ones a test adds: a worker that does not wait
    until it has read the whole stream would take events before it knows the silence."""
    _write_stream(vhost, [encode_record(sync_record())] * records)


def _write_stream(vhost: str, bodies: list[bytes]) -> None:
    """As anyone with write access to the stream could."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.queue_declare("clusteralert.silences", passive=True)
        for body in bodies:
            channel.basic_publish("", "clusteralert.silences", body)


def silence(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("clusteralert-worker", "silence", *args, "--config", str(config))


def _listed(config: Path, *options: str) -> list[dict[str, object]]:
    result = silence(config, "list", "--json", *options)
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def _kind(mail: Received) -> str:
    return str(mail.parsed()["X-Clusteralert-Kind"])


def _alerts(relay: SmtpServer) -> list[str]:
    return [m.event_id for m in relay.received if _kind(m) != "silence"]


def _summaries(relay: SmtpServer) -> list[Received]:
    return [m for m in relay.received if _kind(m) == "silence"]


def _body(mail: Received) -> str:
    part = mail.parsed().get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def test_a_silence_holds_back_node2_on_every_worker_and_its_end_mails_one_summary(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs)
    assert _listed(config) == []  # and the stream is declared
    _fill_stream(vhost, 20_000)
    first, first_port = start_worker(processes, config)
    added = silence(
        config, "add", "monitor:*", "--node", "node2", "--for", "2h", "--comment", "patching node2"
    )
    assert added.returncode == 0, added.stderr
    silence_id = added.stdout.strip()
    assert uuid.UUID(silence_id)
    # In force on a running worker as soon as it has read the record.
    wait_metric(first_port, "clusteralert_silences_active", lambda v: v == 1, 30)

    held = _publish(vhost, "node2")
    mailed = _publish(vhost, "node1")
    assert relay.wait_for(lambda got: len(got) >= 1, timeout=30)
    wait_metric(first_port, SILENCED, lambda v: v == 1, 30)
    assert _alerts(relay) == [mailed]

    # A worker started after the silence was added honours it too, even for events that
    # wait for it in the queue: it reads the silences before it takes any.
    first.stop()
    held2 = _publish(vhost, "node2")
    mailed2 = _publish(vhost, "node1")
    second, second_port = start_worker(processes, config)
    assert relay.wait_for(lambda got: len(got) >= 2, timeout=30)
    wait_metric(second_port, SILENCED, lambda v: v == 1, 30)
    assert _alerts(relay) == [mailed, mailed2]

    # The counts of both workers, from the stream.
    [listed] = _listed(config)
    assert set(listed) == {
        *("id", "matchers", "cluster", "node", "params", "start", "end", "active"),
        *("expired_by", "author", "comment", "held", "summarised", "held_rows"),
    }
    assert listed["id"] == silence_id
    [row] = listed["held_rows"]  # type: ignore[misc]
    first, last = (datetime.fromisoformat(row.pop(end)) for end in ("first", "last"))
    assert row == {"cluster": "c", "key": "monitor:1", "node": "node2", "count": 2}
    assert first < last  # the two events' times
    assert listed["held"] == 2
    assert listed["matchers"] == ["monitor:*"] and listed["node"] == "node2"
    assert listed["comment"] == "patching node2"

    expired = silence(config, "expire", silence_id)
    assert expired.returncode == 0, expired.stderr
    after = _publish(vhost, "node2")
    assert relay.wait_for(lambda got: after in [m.event_id for m in got], timeout=30)
    assert relay.wait_for(lambda got: len(_summaries(relay)) >= 1, timeout=30)
    wait_until(
        lambda: _listed(config, "--all")[0]["summarised"] is True, 30, "the summary recorded"
    )
    [summary] = _summaries(relay)
    body = _body(summary)
    assert silence_id in body and "patching node2" in body
    assert "monitor:1 on node2 (c): 2 event(s)" in body
    assert held not in _alerts(relay) and held2 not in _alerts(relay)
    assert _alerts(relay) == [mailed, mailed2, after]
    assert _listed(config) == []  # no longer active
    assert scrape(second_port)[SILENCED] == 1


def test_a_silence_outlives_a_broker_restart_and_every_worker(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Stops RabbitMQ: nothing about a silence lives anywhere else."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs)
    workers = [start_worker(processes, config)[0] for _ in range(2)]
    added = silence(config, "add", "monitor:*", "--node", "node2", "--for", "2h", "--comment", "x")
    assert added.returncode == 0, added.stderr
    for worker in workers:
        worker.stop()
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)

    held = _publish(vhost, "node2")
    mailed = _publish(vhost, "node1")
    _, port = start_worker(processes, config)
    assert relay.wait_for(lambda got: len(got) >= 1, timeout=60)
    wait_metric(port, SILENCED, lambda v: v == 1, 30)
    assert _alerts(relay) == [mailed] and held not in _alerts(relay)
    [listed] = _listed(config)
    assert listed["id"] == added.stdout.strip() and listed["held"] == 1


def test_counts_survive_a_killed_active_worker_and_a_silence_that_runs_out_mails_its_summary(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Silenced events are acked only once their count is in the stream: kill -9 of the
    active stage loses none of them (the standby counts what it left unacked), and the
    summary, sent when the silence's time is up without any command, covers them all."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs)
    workers = dict(reversed(start_worker(processes, config)) for _ in range(2))
    added = silence(config, "add", "monitor:*", "--node", "node2", "--for", "15s", "--comment", "x")
    assert added.returncode == 0, added.stderr
    for port in workers:
        wait_metric(port, "clusteralert_silences_active", lambda v: v == 1, 10)
    held = [_publish(vhost, "node2") for _ in range(20)]

    def active_port() -> int | None:
        stage = "clusteralert_incident_stage_active"
        return next((p for p in workers if scrape(p).get(stage) == 1), None)

    active = wait_until(active_port, 10, "an active stage")
    # Most likely within the second the active stage waits before it records its counts.
    workers.pop(active).kill()
    [survivor] = workers
    # The time is up; the next event makes sure the survivor is the active stage, even
    # if the killed one had taken every silenced event.
    wait_metric(survivor, "clusteralert_silences_active", lambda v: v == 0, 30)
    after = _publish(vhost, "node2")
    assert relay.wait_for(lambda got: len(_summaries(relay)) >= 1, timeout=30)
    [summary] = _summaries(relay)
    found = re.search(r"monitor:1 on node2 \(c\): (\d+) event", _body(summary))
    counted = int(found.group(1)) if found else 0
    print(f"\n20 silenced events, {counted} counted (more means counted twice, never fewer)")
    assert counted >= len(held)
    assert relay.wait_for(lambda got: _alerts(relay) == [after], timeout=30)
    assert _listed(config, "--all")[0]["held"] == counted
    assert scrape(survivor)[SILENCED] >= 1


def test_hostile_records_in_the_stream_are_skipped_and_the_worker_still_mails(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Records that once stopped the stage of every worker that became active (a time
    out of range in UTC, counts whose sum no longer prints) and 'silence list'."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs)
    assert _listed(config) == []  # and the stream is declared
    ago = datetime.now(UTC) - timedelta(hours=1)
    ended = Silence(str(uuid.uuid4()), ("monitor:*",), ago, ago + timedelta(minutes=1), "al", "ok")
    huge = Silence(str(uuid.uuid4()), ("monitor:*",), ago, ago + timedelta(minutes=1), "al", "x")
    hostile = [
        json.dumps(
            {
                **json.loads(encode_record(Record("add", "forged", silence=ended))),
                "id": "forged",
                "start": "0001-01-01T00:00:00+05:00",
                "end": "0001-01-01T00:30:00+05:00",
            }
        ).encode(),
        encode_record(Record("add", huge.id, silence=huge)),
        *[
            json.dumps({"silences": 1, "type": "held", "id": huge.id, "rows": [row]}).encode()
            for row in [["c", "monitor:1", "n", int("9" * 4300), ago.isoformat(), ago.isoformat()]]
            * 2
        ],
        encode_record(Record("add", ended.id, silence=ended)),
        encode_record(held_record(ended.id, [HeldRow("c", "monitor:1", "node2", 4, ago, ago)])),
    ]
    _write_stream(vhost, hostile)
    worker, _ = start_worker(processes, config)
    mailed = _publish(vhost, "node1")
    assert relay.wait_for(lambda got: mailed in [m.event_id for m in got], timeout=30)
    # The ended silence's summary goes out all the same, and only its.
    assert relay.wait_for(lambda got: len(_summaries(relay)) >= 1, timeout=30)
    assert ended.id in _body(_summaries(relay)[0])
    listed = _listed(config, "--all")
    assert [entry["id"] for entry in listed] == [huge.id, ended.id]
    assert worker.proc.poll() is None
    assert worker.output().count("skipping a record") == 3, worker.output()


def test_a_recovery_a_silence_held_back_still_ends_its_incident(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Failure mailed; silence; the recovery during it is not mailed but counted; the
    silence ends; the failure again is a new incident, mailed (not folded as a repeat
    of one still open)."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    incident = "group_wait = 1\nrepeat_interval = 3600\nstorm_threshold = 0"
    config = write_config(tmp_path, vhost, [relay], certs, incident=incident)
    _, port = start_worker(processes, config)
    failure = _publish(vhost, "node2", monitor="web")
    assert relay.wait_for(lambda got: [m.event_id for m in got] == [failure], timeout=30)
    added = silence(config, "add", "monitor:*", "--node", "node2", "--for", "2h", "--comment", "x")
    assert added.returncode == 0, added.stderr
    wait_metric(port, "clusteralert_silences_active", lambda v: v == 1, 30)
    _publish(vhost, "node2", number=2, monitor="web")
    wait_metric(port, SILENCED, lambda v: v == 1, 30)
    assert silence(config, "expire", added.stdout.strip()).returncode == 0
    assert relay.wait_for(lambda got: len(_summaries(relay)) == 1, timeout=30)
    assert "monitor:2 on node2 (c): 1 event(s)" in _body(_summaries(relay)[0])
    again = _publish(vhost, "node2", monitor="web")
    assert relay.wait_for(lambda got: again in [m.event_id for m in got], timeout=30)
    assert _alerts(relay) == [failure, again]
    metrics = scrape(port)
    assert metrics.get('clusteralert_events_folded_total{reason="repeat"}', 0) == 0
    # Three events from producers; the summary mail is none of theirs.
    assert metrics["clusteralert_events_consumed_total"] == 3
