"""The incident stage end to end: real RabbitMQ, real ``clusteralert-worker run``
processes and a real TLS relay. Events go to the events exchange as producers publish
them; what the operator gets is checked in the relay's mail."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pika

from tests.conftest import Certs, Process, amqp_url, scrape, wait_metric
from tests.pipeline import (
    SMTP_PASSWORD,
    body_ids,
    dlq,
    dlq_list,
    plain_body,
    queue_depth,
    start_worker,
    write_config,
)
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until


def _event(
    module: str = "node",
    event_id: int = 1,
    *,
    reporter: str = "n1",
    params: dict[str, str] | None = None,
    node: str = "n3",
) -> dict[str, object]:
    return {
        "v": 1,
        "id": str(uuid.uuid4()),
        "time": datetime.now(UTC).isoformat(),
        "cluster": "c",
        "node": node,
        "reporter": reporter,
        "module": module,
        "event_id": event_id,
        "params": params if params is not None else {"server": "n3"},
        "source": "test",
    }


def _publish(vhost: str, events: Sequence[dict[str, object]]) -> list[str]:
    """As a producer does: to the events exchange, persistent, mandatory, confirmed."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for event in events:
            channel.basic_publish(
                "clusteralert.events",
                f"{event['module']}.{event['event_id']}.n",
                json.dumps(event).encode(),
                mandatory=True,
                properties=pika.BasicProperties(delivery_mode=2, message_id=str(event["id"])),
            )
    return [str(e["id"]) for e in events]


def _config(tmp_path: Path, vhost: str, relay: SmtpServer, certs: Certs, incident: str) -> Path:
    return write_config(tmp_path, vhost, [relay], certs, incident=incident)


def _settled(port: int, sent: int) -> Callable[[], bool]:
    """The stage holds nothing and the relay took ``sent`` mails: nothing more is due."""

    def probe() -> bool:
        metrics = scrape(port)
        return (
            metrics.get("clusteralert_incident_held") == 0
            and sum(v for k, v in metrics.items() if k.startswith("clusteralert_mails_sent_total"))
            == sent
        )

    return probe


def test_three_reporters_of_one_node_loss_make_one_mail(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = _config(tmp_path, vhost, relay, certs, "group_wait = 1\nstorm_threshold = 0")
    _, port = start_worker(processes, config)
    ids = _publish(vhost, [_event(reporter=r) for r in ("n1", "n2", "n4")])

    assert relay.wait_for(lambda got: len(got) >= 1, timeout=10)
    wait_metric(port, 'clusteralert_events_folded_total{reason="duplicate"}', lambda v: v == 2, 10)
    wait_until(_settled(port, 1), 10, "nothing more held or sent")
    [mail] = relay.received
    assert mail.event_id == ids[0]
    body = plain_body(mail)
    assert "Reported by:" in body
    assert all(reporter in body for reporter in ("n1", "n2", "n4")), body
    metrics = scrape(port)
    assert metrics["clusteralert_incidents_opened_total"] == 1
    assert metrics["clusteralert_incident_stage_active"] == 1


def test_recovery_answers_its_failure_and_within_group_wait_is_one_mail(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = _config(tmp_path, vhost, relay, certs, "group_wait = 0.5\nstorm_threshold = 0")
    _, port = start_worker(processes, config)

    [failure] = _publish(vhost, [_event(params={"server": "n3"})])
    assert relay.wait_for(lambda got: len(got) == 1, timeout=10)
    [recovery] = _publish(vhost, [_event("node", 2, params={"server": "n3"})])
    assert relay.wait_for(lambda got: len(got) == 2, timeout=10)
    first, second = relay.received
    assert first.event_id == failure
    assert second.event_id == recovery
    reply = second.parsed()
    assert reply["In-Reply-To"] == first.parsed()["Message-ID"] == f"<{failure}@example.com>"
    assert reply["References"] == first.parsed()["Message-ID"]
    assert re.search(r"Resolved: .* after \d", plain_body(second)), plain_body(second)
    wait_metric(port, "clusteralert_recoveries_total", lambda v: v == 1, 10)

    # Failure and recovery both within group_wait: one mail says both.
    _publish(
        vhost,
        [_event(params={"server": "n5"}), _event("node", 2, params={"server": "n5"})],
    )
    wait_metric(port, "clusteralert_recoveries_total", lambda v: v == 2, 10)
    wait_until(_settled(port, 3), 10, "one mail for failure and recovery")
    both = relay.received[2]
    assert "Already resolved" in plain_body(both), plain_body(both)


def test_fifty_identical_reports_are_one_mail_and_forty_nine_folded(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = _config(tmp_path, vhost, relay, certs, "group_wait = 0.5\nstorm_threshold = 0")
    _, port = start_worker(processes, config)
    ids = _publish(vhost, [_event() for _ in range(50)])

    def folded() -> float:
        metrics = scrape(port)
        return sum(
            metrics.get(f'clusteralert_events_folded_total{{reason="{r}"}}', 0)
            for r in ("duplicate", "repeat")
        )

    wait_until(lambda: folded() == 49, 15, "49 reports folded")
    wait_until(_settled(port, 1), 10, "one mail")
    [mail] = relay.received
    assert mail.event_id == ids[0]


def test_a_storm_of_500_is_ten_singles_then_digests_and_every_id_is_mailed_once(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    incident = "group_wait = 0\nstorm_threshold = 10\nstorm_window = 2"
    config = _config(tmp_path, vhost, relay, certs, incident)
    _, port = start_worker(processes, config)
    ids = _publish(vhost, [_event("rm", 9, params={"monitor": f"m{i}"}) for i in range(500)])

    def mailed() -> set[str]:
        return set().union(*(body_ids(m) for m in relay.received))

    wait_until(lambda: mailed() >= set(ids), 30, "every event id in a mail")
    wait_until(_settled(port, len(relay.received)), 10, "nothing held")
    singles = [m for m in relay.received if m.parsed()["X-Clusteralert-Kind"] != "digest"]
    digests = [m for m in relay.received if m.parsed()["X-Clusteralert-Kind"] == "digest"]
    assert len(singles) <= 10, len(singles)
    assert digests
    for event_id in ids:
        holders = [m for m in relay.received if event_id in body_ids(m)]
        assert len(holders) == 1, event_id
    assert scrape(port)["clusteralert_digests_sent_total"] == len(digests)


def test_kill_9_of_the_active_stage_holding_a_storm_loses_nothing(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    incident = "group_wait = 0\nstorm_threshold = 5\nstorm_window = 3"
    config = _config(tmp_path, vhost, relay, certs, incident)
    active, active_port = start_worker(processes, config)
    _, standby_port = start_worker(processes, config)
    ids = _publish(vhost, [_event("rm", 9, params={"monitor": f"m{i}"}) for i in range(60)])

    # The first subscriber is the active one; it holds the storm's rest for its digest.
    wait_metric(active_port, "clusteralert_incident_held", lambda v: v >= 50, 10)
    # Newer events of another cluster (another storm group) are mailed and acked now,
    # while the older held ones are not: their acks must not cover those (one ack frame
    # for several deliveries reaches every older one of the channel).
    other = [{**_event("rm", 9, params={"monitor": f"o{i}"}), "cluster": "d"} for i in range(4)]
    ids += _publish(vhost, other)
    wait_until(
        lambda: {str(e["id"]) for e in other} <= {m.event_id for m in relay.received},
        30,
        "the other cluster's events mailed",
    )
    wait_metric(active_port, "clusteralert_incident_held", lambda v: v >= 50, 10)
    assert scrape(standby_port)["clusteralert_incident_stage_active"] == 0
    active.kill()

    def mailed() -> set[str]:
        return set().union(*(body_ids(m) for m in relay.received))

    wait_until(lambda: mailed() >= set(ids), 30, "every event id in a mail after failover")
    assert scrape(standby_port)["clusteralert_incident_stage_active"] == 1
    duplicates = sum(len(body_ids(m)) for m in relay.received) - len(mailed())
    print(f"{len(relay.received)} mails, {duplicates} event id(s) mailed twice after failover")


def test_a_notification_the_broker_refuses_returns_its_events_and_the_stage_backs_off(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """The broker refuses the notification (here: the worker may no longer write to the
    default exchange): the events it covers are not acked but returned, offered again
    only after a pause (not spun into the DLQ by the delivery limit), and mailed once the
    broker takes the notification."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = _config(tmp_path, vhost, relay, certs, "group_wait = 0\nstorm_threshold = 0")
    worker, _ = start_worker(processes, config)

    def write(pattern: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", pattern, ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    write("^(?!amq\\.default$).*")
    [event_id] = _publish(vhost, [_event()])
    wait_until(lambda: worker.output().count("could not publish") >= 2, 15, "two refusals")
    assert relay.received == []
    write(".*")
    assert relay.wait_for(lambda got: [m.event_id for m in got] == [event_id], timeout=40)
    refusals = worker.output().count("could not publish")
    assert refusals < 10, refusals  # paused between tries, far from the delivery limit
    assert queue_depth(vhost, "clusteralert.dead") == 0


def test_a_dead_notification_shows_its_events_and_a_01_dead_letter_still_replays(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    relay.handler.data_replies = ["550 5.7.1 refused"]
    config = _config(tmp_path, vhost, relay, certs, "group_wait = 0.5\nstorm_threshold = 0")
    _, port = start_worker(processes, config)
    first, second = _publish(vhost, [_event(reporter="n1"), _event(reporter="n2")])
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 1, 15
    )
    # A 0.1 dead letter: a bare event, as 0.1 workers dead-lettered them.
    old = _event(params={"server": "old"})
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "clusteralert.dlx",
            "",
            json.dumps(old).encode(),
            pika.BasicProperties(delivery_mode=2, message_id=str(old["id"])),
            mandatory=True,
        )

    rows = {str(r["id"]): r for r in dlq_list(config)}
    assert set(rows) == {first, str(old["id"])}
    assert rows[first]["notification"] == "incident of 2 event(s): node:1 x2"
    assert rows[first]["event"] == "node:1"
    assert "notification" not in rows[str(old["id"])]
    shown = dlq(config, "show", second)  # found by any event id it covers
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["event_ids"] == [first, second]

    replay = dlq(config, "replay")
    assert replay.returncode == 0, replay.stderr
    assert relay.wait_for(lambda got: len(got) == 2, timeout=20)
    by_id = {m.event_id: m for m in relay.received}
    assert set(by_id) == {first, str(old["id"])}
    assert "n1" in plain_body(by_id[first]) and "n2" in plain_body(by_id[first])
    assert queue_depth(vhost, "clusteralert.dead") == 0
