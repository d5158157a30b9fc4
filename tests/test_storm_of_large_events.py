"""A storm of the largest events the wire allows, end to end: real RabbitMQ, a real
``clusteralert-worker run`` and a real TLS relay with Postfix's default size limit.

Each event has 64 params of 4 KiB (the codec cuts them to fit its 64 KiB), every value
carrying CR/LF and header text, and the catalog's text names all 64, so a digest line
would show each. A thousand of them in one storm: every event id must reach exactly one
mail, each mail within the relay's limit, none with an injected header, nothing in the
DLQ."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pika

from shared.event import MAX_EVENT_BYTES, MAX_PARAMS, encode_event, new_event
from tests.conftest import Certs, Process, amqp_url, scrape
from tests.pipeline import (
    SMTP_PASSWORD,
    body_ids,
    dlq_list,
    queue_depth,
    start_worker,
    write_config,
)
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

EVENTS = 1000
POSTFIX_LIMIT = 10_240_000  # Postfix's default message_size_limit
HOSTILE = ("x\r\nBcc: evil@example.net\r\nSubject: forged\r\n" * 100)[:4096]


def _catalog(tmp_path: Path) -> Path:
    names = [f"p{k}" for k in range(MAX_PARAMS)]
    path = tmp_path / "big.toml"
    path.write_text(
        "[[message]]\n"
        'module = "big"\nevent_id = 1\nlevel = "error"\nmail = true\n'
        'identity = ["p0"]\n'
        f'text = "{" ".join("{" + name + "}" for name in names)}"\n'
    )
    return path


def _publish(vhost: str) -> list[str]:
    """As a producer does: built by the event codec, to the events exchange, persistent,
    mandatory, confirmed. The codec fits one such event to the wire limit (it takes a
    while: it halves the largest value until the event fits); the others are copies with
    their own id and first param, so each is an incident of its own."""
    params = {f"p{k}": HOSTILE for k in range(MAX_PARAMS)}
    fitted = new_event(
        module="big", event_id=1, cluster="c", node="n1", source="test", params=params
    )
    ids = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(EVENTS):
            event = replace(
                fitted,
                id=str(uuid.uuid4()),
                reporter=f"n{i % 4}",
                params={**fitted.params, "p0": f"e{i:04d}{fitted.params['p0'][5:]}"},
            )
            body = encode_event(event)
            assert len(body) > MAX_EVENT_BYTES - 4096  # as large as the wire allows
            channel.basic_publish(
                "clusteralert.events",
                "big.1.n",
                body,
                mandatory=True,
                properties=pika.BasicProperties(delivery_mode=2, message_id=event.id),
            )
            ids.append(event.id)
    return ids


def test_a_storm_of_a_thousand_largest_events_is_mailed_whole_within_the_relay_limit(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    relay.data_size_limit = POSTFIX_LIMIT
    config = write_config(
        tmp_path,
        vhost,
        [relay],
        certs,
        extra=f'[catalog]\npath = "{_catalog(tmp_path)}"\n',
        incident="group_wait = 0\nstorm_threshold = 10\nstorm_window = 3",
    )
    _, port = start_worker(processes, config)
    ids = _publish(vhost)

    def mailed() -> list[str]:
        return [i for m in relay.received for i in body_ids(m)]

    wait_until(lambda: set(mailed()) >= set(ids), 60, "every event id in a mail")
    wait_until(lambda: scrape(port).get("clusteralert_incident_held") == 0, 10, "nothing held")
    got = mailed()
    assert sorted(got) == sorted(ids), "each event id in exactly one mail"
    digests = [m for m in relay.received if m.parsed()["X-Clusteralert-Kind"] == "digest"]
    assert digests  # the storm's rest went out as digests (how many is the stage's choice)
    for mail in relay.received:
        assert len(mail.data) < POSTFIX_LIMIT
        head = mail.data.split(b"\r\n\r\n", 1)[0]
        assert b"evil" not in head and b"forged" not in head
        parsed = mail.parsed()
        assert parsed["Bcc"] is None
        assert sorted(mail.rcpt_tos) == ["oncall@example.com", "ops@example.com"]
    assert dlq_list(config) == []
    assert queue_depth(vhost) == 0
    print(
        f"{len(relay.received)} mails, {len(digests)} digests, largest "
        f"{max(len(m.data) for m in relay.received)} bytes"
    )
