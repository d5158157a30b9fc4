"""End to end with real processes started as the README says: ``clusteralert-producer
run``, ``clusteralert-worker run``, events emitted with the CLI, a real RabbitMQ and a
real STARTTLS relay with AUTH. Exactly the reported events must arrive, over TLS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Certs, Process, amqp_url, scrape, wait_metric
from tests.pipeline import SMTP_PASSWORD, emit, queue_depth, start_worker, write_config
from tests.smtpserver import SmtpServer

pytestmark = pytest.mark.integration

# (module, event_id, extra args, reported?) -- with [filter] min_level = "warning",
# disable = ["group:2"], and the shipped catalog.
# No filtered event ends a mailed incident: the incident stage would mail its recovery as
# a reply to it, even with grouping off.
EVENTS: list[tuple[str, int, list[str], bool]] = [
    *[("node", 1, ["--param", f"server=srv{i}"], True) for i in range(3)],
    ("node", 1, ["--param", "server=ノード1", "--node", "東京-1"], True),
    *[("group", 1, ["--param", "group=g1", "from_server=a", "to_server=b"], True)] * 3,
    *[("monitor", 1, ["--param", "monitor=httpw", "detail=timeout"], True)] * 2,
    ("monitor", 1, ["--param", "monitor=x\r\nBcc: victim@example.com", "detail=y"], True),
    *[("heartbeat", 2, ["--param", "interface=eth1", "server=b"], False)] * 2,  # catalog
    *[("group", 2, ["--param", "group=g1", "to_server=b"], False)] * 2,  # disabled
    *[("node", 2, ["--param", "server=srv9"], False)] * 2,  # min_level
    *[("custom", 7, ["--level", "info", "--text", "routine"], False)] * 2,  # unknown
    *[("monitor", 2, ["--param", "monitor=other"], False)] * 2,  # catalog
]


FILTERS = """
[filter]
min_level = "warning"
disable = ["group:2"]
"""


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_emitted_events_arrive_as_tls_mail_exactly_when_reported(
    event_loop: str,
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    loop = f'[worker]\nevent_loop = "{event_loop}"\n'
    config = write_config(
        tmp_path, vhost, [relay], certs, extra=FILTERS + loop, charset="iso-2022-jp"
    )
    worker, port = start_worker(processes, config)
    producer = processes("clusteralert-producer", "run", "--config", str(config))

    reported: set[str] = set()
    for module, event_id, extra, mailed in EVENTS:
        event_uuid = emit(config, "--module", module, "--event-id", str(event_id), *extra)
        if mailed:
            reported.add(event_uuid)
    assert len(reported) == 10

    arrived = relay.wait_for(lambda got: len(got) >= len(reported), timeout=60)
    assert arrived, f"{len(relay.received)} mails\n{worker.output()}\n{producer.output()}"
    wait_metric(port, "clusteralert_events_consumed_total", lambda v: v == len(EVENTS), 30)
    metrics = scrape(port)
    filtered = {
        r: metrics[f'clusteralert_events_filtered_total{{reason="{r}"}}']
        for r in ("catalog", "disabled", "min_level", "unknown")
    }
    assert filtered == {"catalog": 4, "disabled": 2, "min_level": 2, "unknown": 2}

    mails = relay.received
    assert len(mails) == len(reported)  # nothing filtered slipped through
    got_ids = set()
    for received in mails:
        assert received.tls and received.auth_login == "alert"
        assert sorted(received.rcpt_tos) == ["oncall@example.com", "ops@example.com"]
        message = received.parsed()
        assert message["Bcc"] is None
        assert message.get_content_charset() == "iso-2022-jp"
        event_id = message["Message-ID"].strip("<>").split("@")[0]
        assert event_id in message.get_content()
        got_ids.add(event_id)
    assert got_ids == reported
    subjects = [m.parsed()["Subject"] for m in mails]
    assert "[error] prod-cluster 東京-1: Server ノード1 is down." in subjects

    relay_label = f"127.0.0.1:{relay.port}"
    assert metrics[f'clusteralert_mails_sent_total{{relay="{relay_label}"}}'] == len(reported)
    assert metrics['clusteralert_tls_refused_total{cause="not_offered"}'] == 0
    # Secrets stay out of logs and metrics.
    exposition = "\n".join(metrics)
    for process in (worker, producer):
        assert process.stop() == 0
        assert SMTP_PASSWORD not in process.output()
    assert f"sending mail on the {event_loop} event loop" in worker.output()
    assert SMTP_PASSWORD not in exposition
    assert not list((tmp_path / "spool").glob("*.json"))
    # With the worker gone, anything it had not acked is back on the queue: the ten
    # filtered events must have been acked, not just left alone.
    assert queue_depth(vhost) == 0


def test_a_malformed_event_is_dead_lettered_and_the_worker_goes_on(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    import pika

    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs, extra=FILTERS, charset="iso-2022-jp")
    _, port = start_worker(processes, config)
    good = (
        b'{"v":1,"id":"6f1c7f4e-4b7e-4a8e-9d55-0f4c3bfe2a10","time":"2026-11-26T03:00:00Z",'
        b'"cluster":"c","node":"n","module":"node","event_id":1,"params":{"server":"db1"},'
        b'"source":"test"}'
    )
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in (b"{not json", b'{"v":1,"id":"x"}', good):
            channel.basic_publish("clusteralert.events", "node.1.n", body, mandatory=True)
    assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="invalid_event"}', lambda v: v == 2, 30
    )
    assert "6f1c7f4e-4b7e-4a8e-9d55-0f4c3bfe2a10" in relay.received[0].parsed()["Message-ID"]
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        dead = connection.channel().queue_declare("clusteralert.dead", passive=True)
    assert dead.method.message_count == 2
