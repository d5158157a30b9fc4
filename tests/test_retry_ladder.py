"""The retry ladder and the dead-letter queue through the real broker, with the real
worker process: every rung climbed, the retry window running out, the headers a dead
letter carries, and the broker's own delivery-limit dead-lettering.

The rungs' TTLs (30 s, 5 min, 30 min) are fixed queue arguments. A test cannot wait for
them, so each test's vhost gets a policy with a short ``message-ttl`` on the retry queues:
RabbitMQ applies the lower of a policy's TTL and the queue's own, so the worker declares
exactly its production topology and the ladder still moves in a fraction of a second.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest

from shared.config import parse_config
from tests.conftest import Certs, Process, amqp_url, scrape, wait_metric
from tests.pipeline import (
    dlq,
    publish_events,
    queue_depth,
    short_rungs,
    start_worker,
    take_messages,
    write_config,
)
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until
from worker.broker import connect_any, declare_topology

pytestmark = pytest.mark.integration

Servers = Callable[..., SmtpServer]
Processes = Callable[..., Process]
DOCUMENTED_HEADERS = {
    "x-clusteralert-reason",
    "x-clusteralert-last-error",
    "x-clusteralert-attempts",
    "x-clusteralert-first-failure",
    "x-clusteralert-last-failure",
    "x-clusteralert-worker",
}


def dead_letter(config: Path, event_id: str) -> dict[str, object]:
    shown = dlq(config, "show", event_id)
    assert shown.returncode == 0, shown.stderr
    doc: dict[str, object] = json.loads(shown.stdout)
    return doc


def test_a_transient_failure_climbs_every_rung_then_the_window_dead_letters_it(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    short_rungs(vhost)
    relay = smtp_server("starttls")
    relay.go_down()  # connection refused, every time: transient
    config = write_config(
        tmp_path, vhost, [relay], certs, auth=False, extra="[worker]\nretry_window = 10\n"
    )
    worker, port = start_worker(processes, config)
    started = datetime.now(UTC)
    [event_id] = publish_events(vhost, 1)
    wait_metric(port, 'clusteralert_dead_lettered_total{reason="connect"}', lambda v: v == 1, 60)
    ended = datetime.now(UTC)

    rungs = re.findall(rf"retry scheduled for event {event_id} \S+ in (\S+) ", worker.output())
    # 30 s, then 5 min, then 30 min (and 30 min again) until the window ran out.
    assert rungs[:3] == ["30s", "5m", "30m"], worker.output()[-3000:]
    assert set(rungs[3:]) <= {"30m"}
    metrics = scrape(port)
    assert metrics['clusteralert_retries_total{stage="delayed"}'] == len(rungs)

    doc = dead_letter(config, event_id)
    headers = doc["headers"]
    assert isinstance(headers, dict)
    assert set(headers) >= DOCUMENTED_HEADERS, headers
    assert "x-clusteralert-tls-cause" not in headers  # not a TLS failure
    assert headers["x-clusteralert-reason"] == "connect"
    assert headers["x-clusteralert-attempts"] == len(rungs) + 1
    first = datetime.fromisoformat(str(headers["x-clusteralert-first-failure"]))
    last = datetime.fromisoformat(str(headers["x-clusteralert-last-failure"]))
    assert started <= first < last <= ended
    # Dead-lettered because the window since the first failure was used up.
    assert last - first >= timedelta(seconds=10)
    assert str(headers["x-clusteralert-worker"])
    assert f"port {relay.port}" in str(headers["x-clusteralert-last-error"])
    assert queue_depth(vhost) == 0
    for suffix in ("30s", "5m", "30m"):
        assert queue_depth(vhost, f"clusteralert.retry.{suffix}") == 0


def test_a_tls_refusal_is_dead_lettered_with_its_cause_before_the_ack(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", context=None)  # STARTTLS not offered
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    worker, port = start_worker(processes, config)
    [event_id] = publish_events(vhost, 1)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="tls_refused"}', lambda v: v == 1, 30
    )
    headers = dead_letter(config, event_id)["headers"]
    assert isinstance(headers, dict)
    assert DOCUMENTED_HEADERS | {"x-clusteralert-tls-cause"} <= set(headers), headers
    assert headers["x-clusteralert-tls-cause"] == "not_offered"
    assert headers["x-clusteralert-attempts"] == 1
    assert headers["x-clusteralert-first-failure"] == headers["x-clusteralert-last-failure"]
    assert worker.stop() == 0
    # Exactly one copy, in the DLQ; none left behind or returned to the work queue.
    assert queue_depth(vhost) == 0
    assert queue_depth(vhost, "clusteralert.dead") == 1


def test_a_dead_letter_the_broker_cannot_route_is_not_acked(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    """Confirmed before the ack: with the DLQ unbound from its exchange, the dead letter
    is returned unroutable, so the original must stay on the work queue."""
    relay = smtp_server("starttls")
    relay.handler.data_replies = ["550 5.7.1 refused"] * 100
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    worker, port = start_worker(processes, config)
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        connection.channel().queue_unbind("clusteralert.dead", "clusteralert.dlx", "")
    publish_events(vhost, 1)
    wait_until(lambda: "not confirmed" in worker.output(), 30, "the unroutable dead letter")
    assert worker.stop() == 0
    assert queue_depth(vhost, "clusteralert.dead") == 0
    # Not lost: back on the work queue, to be dead-lettered once the DLQ is reachable.
    assert queue_depth(vhost) == 1


@pytest.mark.parametrize("queue", ["clusteralert.incoming", "clusteralert.mail"])
def test_the_brokers_delivery_limit_dead_letters_a_poison_message(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, queue: str
) -> None:
    """A message that keeps coming back unsettled (as one that crashes every worker
    does) is dead-lettered by RabbitMQ itself after the queue's delivery limit (the
    incident stage's input and the work queue alike), and ``dlq`` shows it with reason
    ``delivery_limit``."""
    relay = smtp_server("starttls")
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)
    [event_id] = publish_events(vhost, 1)
    if queue == "clusteralert.mail":  # as the incident stage passes it on
        [(_, properties, body)] = take_messages(vhost, "clusteralert.incoming")
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, body, properties, mandatory=True)
    deliveries = 0
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        # A consumer, not basic.get, which a single-active-consumer queue refuses.
        for method, _, _ in channel.consume(queue, inactivity_timeout=0.2):
            if method is None:
                if queue_depth(vhost, "clusteralert.dead") == 1:
                    break
                continue
            deliveries += 1
            channel.basic_nack(method.delivery_tag, requeue=True)  # as a crash would
            assert deliveries <= 100, "the broker never dead-lettered it"
        channel.cancel()
    assert deliveries > 1
    wait_until(lambda: queue_depth(vhost, "clusteralert.dead") == 1, 30, "the dead letter")
    doc = dead_letter(config, event_id)
    assert doc["reason"] == "delivery_limit", doc
