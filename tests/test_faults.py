"""Bad days, with real processes, a real RabbitMQ and real TLS relays: relays that fail,
refuse, strip STARTTLS or go away; workers killed or stopped mid-load; the broker
restarted. No alert may be lost, and none may go out in plaintext."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from tests.conftest import Certs, Process, amqp_url, scrape, wait_metric
from tests.pipeline import (
    SMTP_PASSWORD,
    dlq,
    dlq_list,
    emit,
    publish_events,
    received_ids,
    short_rungs,
    start_worker,
    write_config,
)
from tests.smtpserver import SECRET, SmtpServer, secret_forms
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

Servers = Callable[..., SmtpServer]
Processes = Callable[..., Process]
CREDENTIALS = ("alert", SMTP_PASSWORD)


def dead_lettered(port: int) -> float:
    metrics = scrape(port)
    return sum(v for k, v in metrics.items() if k.startswith("clusteralert_dead_lettered_total"))


def duplicates(relay: SmtpServer) -> int:
    counts = Counter(received_ids(relay))
    return sum(n - 1 for n in counts.values())


def test_relay_outage_is_bridged_by_the_retry_ladder(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    # The rungs shortened to 1 s (a policy, the worker's topology unchanged): a message
    # still leaves the worker for a retry queue and comes back from it, without the 30 s.
    short_rungs(vhost, 1000)
    config = write_config(tmp_path, vhost, [relay], certs, extra="[worker]\nretry_window = 600\n")
    worker, port = start_worker(processes, config)
    relay.go_down()
    ids = publish_events(vhost, 5)
    # In-process retries give up after a few seconds; then each goes to a rung. Each one:
    # with 1 s rungs one event could climb several times and fill the count alone.
    wait_until(
        lambda: set(re.findall(r"retry scheduled for event (\S+) ", worker.output())) >= set(ids),
        60,
        "every event scheduled on a rung",
    )
    wait_metric(port, 'clusteralert_retries_total{stage="delayed"}', lambda v: v >= 5, 10)
    relay.come_back()
    assert relay.wait_for(lambda got: len(got) >= 5, timeout=90)
    assert set(received_ids(relay)) == set(ids)
    assert dead_lettered(port) == 0
    assert scrape(port)['clusteralert_retries_total{stage="inprocess"}'] >= 5


def test_550_is_dead_lettered_at_once_and_not_retried(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_replies = ["550 5.7.1 message refused"]
    config = write_config(tmp_path, vhost, [relay], certs)
    _, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 1, 30
    )
    [row] = dlq_list(config)
    assert (row["id"], row["reason"], row["attempts"]) == (event_id, "rejected_5xx", 1)
    assert "550 5.7.1 message refused" in str(row["last_error"])
    assert relay.handler.data_commands == 1
    metrics = scrape(port)
    assert metrics['clusteralert_retries_total{stage="inprocess"}'] == 0
    assert metrics['clusteralert_retries_total{stage="delayed"}'] == 0


def test_bad_password_is_dead_lettered_with_reason_auth_and_never_shown(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=("alert", "the-right-one"))
    config = write_config(tmp_path, vhost, [relay], certs)  # sends SMTP_PASSWORD
    worker, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    wait_metric(port, 'clusteralert_dead_lettered_total{reason="auth"}', lambda v: v == 1, 30)
    assert relay.received == []
    shown = dlq(config, "show", event_id)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["reason"] == "auth"
    assert doc["headers"]["x-clusteralert-worker"]
    # Scraped while the worker runs: the exposition must be real, and hold the auth failure.
    exposition = json.dumps(scrape(port))
    assert 'clusteralert_dead_lettered_total{reason=\\"auth\\"}' in exposition
    assert worker.stop() == 0
    for text in (shown.stdout, worker.output(), exposition):
        assert SMTP_PASSWORD not in text


def test_stripped_starttls_sends_nothing_then_replay_delivers_after_the_fix(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    # STARTTLS stripped; the relay would check the password and take the mail in plaintext.
    stripped = smtp_server("starttls", context=None, credentials=CREDENTIALS)
    config = write_config(tmp_path, vhost, [stripped], certs)
    worker, port = start_worker(processes, config)
    ids = publish_events(vhost, 3)
    wait_metric(port, "clusteralert_events_consumed_total", lambda v: v == 3, 30)
    wait_metric(port, "clusteralert_in_flight", lambda v: v == 0, 30)
    assert b"EHLO" in stripped.cleartext.upper()
    for form in secret_forms(*CREDENTIALS):  # not the password, in any encoding
        assert form not in stripped.cleartext, form
    assert stripped.received == []
    assert stripped.handler.data_commands == 0  # nor one byte of mail in the clear
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="tls_refused"}', lambda v: v == 3, 30
    )
    assert scrape(port)['clusteralert_tls_refused_total{cause="not_offered"}'] >= 3
    # Browsing takes and gives back: two listings see the same three.
    for _ in range(2):
        rows = dlq_list(config)
        assert sorted(r["id"] for r in rows) == sorted(ids)
        assert {r["reason"] for r in rows} == {"tls_refused"}
    assert worker.stop() == 0

    # The operator fixes the relay (now with STARTTLS) and replays.
    fixed = smtp_server("starttls", credentials=CREDENTIALS)
    fixed_config = write_config(tmp_path, vhost, [fixed], certs, name="fixed.toml")
    _, port = start_worker(processes, fixed_config)
    dry = dlq(fixed_config, "replay", "--reason", "tls_refused", "--dry-run")
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 3
    assert len(dlq_list(fixed_config)) == 3
    replay = dlq(fixed_config, "replay", "--reason", "tls_refused")
    assert replay.returncode == 0, replay.stderr
    assert "replayed 3 dead letter(s)" in replay.stderr
    assert fixed.wait_for(lambda got: len(got) >= 3, timeout=30)
    assert sorted(received_ids(fixed)) == sorted(ids)
    assert all(m.tls and m.auth_login == "alert" for m in fixed.received)
    for form in secret_forms(*CREDENTIALS):
        assert form not in fixed.cleartext, form
    wait_metric(port, "clusteralert_replayed_total", lambda v: v == 3, 30)
    assert dlq_list(fixed_config) == []


def test_purge_asks_first_and_takes_filters(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_replies = ["550 no"] * 3
    config = write_config(tmp_path, vhost, [relay], certs)
    _, port = start_worker(processes, config)
    first, *rest = publish_events(vhost, 3)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 3, 30
    )
    for answer in ("n\n", ""):  # "no", and no answer at all (stdin closed)
        no = dlq(config, "purge", "--id", first, stdin=answer)
        assert no.returncode == 1, no.stderr
        assert "nothing purged" in no.stderr
    assert len(dlq_list(config)) == 3
    yes = dlq(config, "purge", "--id", first, "--yes")
    assert yes.returncode == 0, yes.stderr
    assert sorted(r["id"] for r in dlq_list(config)) == sorted(rest)


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_a_worker_stopped_mid_load_loses_nothing(
    stop: str, tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 0.05
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, _ = start_worker(processes, config)
    ids = publish_events(vhost, 300)
    assert relay.wait_for(lambda got: len(got) >= 60, timeout=60)
    if stop == "kill":
        worker.kill()
    else:
        assert worker.stop() == 0
        assert "shutting down" in worker.output()
    start_worker(processes, config)
    assert relay.wait_for(lambda got: set(ids) <= set(received_ids(got)), timeout=120)
    dups = duplicates(relay)
    print(f"\n{stop}: {len(relay.received)} mails for {len(ids)} events, {dups} duplicates")
    if stop == "kill":
        assert dups <= 32  # at most the prefetch of the killed worker
    else:
        assert dups == 0  # a clean stop finishes or returns its work: no duplicates


def test_a_slow_mail_in_flight_when_the_worker_is_killed_is_mailed_by_the_next(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    # The third mail hangs in DATA while the others go out and are acked, in batches: an
    # ack with multiple past it would take it from the queue, and the kill would lose it.
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay_at[3] = 120.0
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, port = start_worker(processes, config)
    ids = publish_events(vhost, 40)
    assert relay.wait_for(lambda got: len(got) == len(ids) - 1, timeout=30)
    wait_metric(port, "clusteralert_in_flight", lambda v: v == 1, 10)
    [slow] = set(ids) - set(received_ids(relay))
    worker.kill()
    start_worker(processes, config)
    assert relay.wait_for(lambda got: slow in received_ids(got), timeout=30)
    assert set(received_ids(relay)) == set(ids)
    assert received_ids(relay).count(slow) == 1
    assert duplicates(relay) <= 32  # at most the prefetch of the killed worker


def test_heartbeats_flow_while_a_relay_is_slow(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    # A 1 s heartbeat and a relay that takes 6 s per mail: if the SMTP send blocked the
    # connection's thread, the broker would drop the connection and redeliver the mail.
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 6.0
    config = write_config(tmp_path, vhost, [relay], certs, broker_extra="heartbeat = 1")
    worker, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
    wait_metric(port, "clusteralert_in_flight", lambda v: v == 0, 10)
    assert received_ids(relay) == [event_id]
    metrics = scrape(port)
    assert metrics["clusteralert_events_consumed_total"] == 1
    assert metrics["clusteralert_broker_connected"] == 1
    assert "broker connection failed" not in worker.output()


def test_broker_restart_while_delivering(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 0.02
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, port = start_worker(processes, config)
    producer = processes("clusteralert-producer", "run", "--config", str(config))
    ids = publish_events(vhost, 200)
    assert relay.wait_for(lambda got: len(got) >= 20, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
    try:
        wait_metric(port, "clusteralert_broker_connected", lambda v: v == 0, 30)
        # A node event while the broker is away waits in the spool.
        ids.append(emit(config, "--module", "node", "--event-id", "1", "--param", "server=x"))
    finally:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    assert relay.wait_for(lambda got: set(ids) <= set(received_ids(got)), timeout=120), (
        worker.output()[-3000:]
    )
    assert worker.proc.poll() is None and producer.proc.poll() is None
    wait_until(lambda: scrape(port).get("clusteralert_broker_connected") == 1, 30, "reconnect")
    print(
        f"\nbroker restart: {len(relay.received)} mails for {len(ids)} events, "
        f"{duplicates(relay)} duplicates"
    )


def queued(vhost: str) -> int:
    """Messages in the work queue and the retry ladder of ``vhost``."""
    names = ["clusteralert.mail"] + [f"clusteralert.retry.{r}" for r in ("30s", "5m", "30m")]
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        return sum(channel.queue_declare(n, passive=True).method.message_count for n in names)


def settled(vhost: str, port: int, consumed: int) -> bool:
    """The worker consumed ``consumed`` messages, holds none, and none wait anywhere."""
    metrics = scrape(port)
    return (
        metrics.get("clusteralert_events_consumed_total") == consumed
        and metrics.get("clusteralert_in_flight") == 0
        and queued(vhost) == 0
    )


def test_a_greylisted_recipient_gets_the_mail_later_through_the_retry_ladder(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    # oncall@ is greylisted once (450), as greylisting relays do with a new sender.
    relay.handler.rcpt_replies = {"oncall@example.com": ["450 4.2.0 greylisted, come back later"]}
    short_rungs(vhost, 300)
    config = write_config(tmp_path, vhost, [relay], certs, extra="[worker]\nretry_window = 600\n")
    _, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    assert relay.wait_for(lambda got: len(got) >= 2, timeout=20)
    # The original and its one retry copy, and nothing left anywhere to send more.
    wait_until(lambda: settled(vhost, port, 2), 20, "the retry copy settled")
    first, later = relay.received
    assert first.rcpt_tos == ["ops@example.com"]
    assert later.rcpt_tos == ["oncall@example.com"]
    assert first.event_id == later.event_id == event_id
    assert first.parsed()["Message-ID"] == later.parsed()["Message-ID"]
    # The retry addressed the greylisted recipient only.
    assert relay.handler.rcpt_commands == [
        "ops@example.com",
        "oncall@example.com",
        "oncall@example.com",
    ]
    metrics = scrape(port)
    assert metrics['clusteralert_retries_total{stage="delayed"}'] == 1
    assert metrics["clusteralert_recipients_refused_total"] == 1
    assert dead_lettered(port) == 0


def test_recipients_greylisted_past_the_window_are_dead_lettered_and_replayed_alone(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.rcpt_replies = {"oncall@example.com": "450 4.2.0 greylisted, come back later"}
    short_rungs(vhost, 200)
    config = write_config(tmp_path, vhost, [relay], certs, extra="[worker]\nretry_window = 2\n")
    _, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_4xx"}', lambda v: v == 1, 30
    )
    assert [m.rcpt_tos for m in relay.received] == [["ops@example.com"]]
    assert set(relay.handler.rcpt_commands[2:]) == {"oncall@example.com"}
    shown = dlq(config, "show", event_id)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["reason"] == "rejected_4xx" and doc["attempts"] >= 2
    assert doc["headers"]["x-clusteralert-recipients"] == "oncall@example.com"
    assert "greylisted" in doc["last_error"]

    relay.handler.rcpt_replies = {}  # the greylisting is over
    replay = dlq(config, "replay", "--id", event_id)
    assert replay.returncode == 0, replay.stderr
    assert relay.wait_for(lambda got: len(got) >= 2, timeout=20)
    consumed = scrape(port)["clusteralert_events_consumed_total"]
    wait_until(lambda: settled(vhost, port, int(consumed)), 20, "the replay settled")
    assert [m.rcpt_tos for m in relay.received] == [["ops@example.com"], ["oncall@example.com"]]
    assert received_ids(relay) == [event_id, event_id]
    assert dlq_list(config) == []


@pytest.mark.parametrize(
    "where",
    ["auth_plain", "auth_login", "mail_451", "rcpt_450", "rcpt_550", "data_451", "data_554"],
)
def test_a_relay_echoing_the_password_never_gets_it_into_logs_headers_or_metrics(
    where: str,
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Servers,
    processes: Processes,
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    step, _, code = where.partition("_")
    echo = f"{code} 4.7.0 refused, you said {SECRET}"
    if step == "auth":
        relay.credentials = ("alert", "the-right-one")  # the worker sends SMTP_PASSWORD
        relay.auth_mechanisms = (code.upper(),)
        relay.auth_failure_reply = f"535 5.7.8 bad credentials {SECRET}"
    elif step == "mail":
        relay.handler.mail_replies = [echo] * 10
    elif step == "rcpt":  # one of the two recipients refused, the other accepted
        relay.handler.rcpt_replies = {"oncall@example.com": echo}
    else:
        relay.handler.data_replies = [echo] * 10
    # No retry window: every failure ends in the DLQ after the in-process retries.
    config = write_config(tmp_path, vhost, [relay], certs, extra="[worker]\nretry_window = 0\n")
    worker, port = start_worker(processes, config, "--verbose")
    [event_id] = publish_events(vhost, 1)
    wait_until(lambda: settled(vhost, port, 1), 30, "the event settled")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    rows = dlq_list(config)
    shown = "".join(dlq(config, "show", str(row["id"])).stdout for row in rows)
    assert worker.stop() == 0
    log = worker.output()
    outputs = {"log": log, "metrics": exposition, "dlq list": json.dumps(rows), "dlq show": shown}
    forms = [f.decode() for f in secret_forms("alert", SMTP_PASSWORD)]
    assert [(name, f) for name, text in outputs.items() for f in forms if f in text] == []
    # The echo did reach the worker, which logged it masked.
    assert "********" in log
    assert len(rows) == (0 if where == "rcpt_550" else 1)
