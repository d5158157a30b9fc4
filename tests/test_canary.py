"""The canary through the whole path, against a real RabbitMQ, worker and TLS relay: its
success time advances while the relay takes it, stops when the relay refuses AUTH, and
the refused canary is dead-lettered like any other mail. It goes to ``[canary] to`` only
and is never grouped, whatever the incident settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from shared.event import encode_event, routing_key
from shared.own_events import canary_event, probe_event
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Certs, Process, amqp_url, scrape
from tests.pipeline import SMTP_PASSWORD, dlq_list, start_worker, write_config
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

CANARY = "clusteralert_canary_last_success_timestamp_seconds"
CANARY_TO = "canary@example.com"


def _canaries(relay: SmtpServer) -> list[str]:
    return [
        r.event_id for r in relay.received if r.parsed()["X-Clusteralert-Module"] == "clusteralert"
    ]


def test_canary_success_advances_and_stops_when_the_relay_refuses_auth(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    # Grouping as in production: the canary must not be held, folded or digested.
    config = write_config(
        tmp_path,
        vhost,
        [relay],
        certs,
        extra=f'[canary]\ninterval = 2\nto = ["{CANARY_TO}"]',
        incident="group_wait = 30\nrepeat_interval = 3600\nstorm_threshold = 1",
    )
    _, port = start_worker(processes, config)

    first = wait_until(lambda: scrape(port).get(CANARY) or None, 30, "a first canary")
    later = wait_until(
        lambda: v if (v := scrape(port).get(CANARY, 0)) > first else None,
        30,
        "a later canary",
    )
    assert later > first
    assert len(set(_canaries(relay))) >= 2
    for mail in relay.received:
        assert mail.rcpt_tos == [CANARY_TO]
        assert mail.parsed()["X-Clusteralert-Event"] == "2"

    # The relay now refuses the password; dropping its connections makes the worker
    # log in again.
    relay.credentials = ("alert", "a-new-password")
    relay.go_down()
    relay.come_back()
    dead = wait_until(
        lambda: [r for r in dlq_list(config) if r.get("reason") == "auth"] or None,
        60,
        "a canary dead-lettered for auth",
    )
    stuck = scrape(port)[CANARY]
    # Two more intervals: further canaries fail too, and the time stands still.
    wait_until(lambda: len(dlq_list(config)) >= len(dead) + 2, 30, "two more refused canaries")
    assert scrape(port)[CANARY] == stuck
    assert all(row.get("event") == "clusteralert:2" for row in dlq_list(config)), dlq_list(config)


def test_only_the_active_stage_sends_canaries_and_a_standby_takes_over(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Two workers, an idle deployment (no cluster sends anything): the standby's probes
    make the active stage known, only it publishes canaries; when it is killed, the
    standby's next probe reaches it as the new active stage, and the canary goes on."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    extra = f'[canary]\ninterval = 1\nto = ["{CANARY_TO}"]'
    config = write_config(tmp_path, vhost, [relay], certs, extra=extra)
    workers = [start_worker(processes, config) for _ in range(2)]
    published = "clusteralert_canaries_published_total"

    def counts() -> list[float]:
        return [scrape(port).get(published, 0) for _, port in workers]

    wait_until(lambda: sum(counts()) >= 4, 30, "four canaries")
    assert sorted(counts())[0] == 0, counts()  # the standby sent none
    active, standby = sorted(workers, key=lambda w: -scrape(w[1]).get(published, 0))
    assert scrape(active[1])["clusteralert_incident_stage_active"] == 1
    assert scrape(standby[1])["clusteralert_incident_stage_active"] == 0
    assert relay.wait_for(lambda got: len(got) >= 4, 30)

    active[0].kill()
    mailed = len(relay.received)
    wait_until(lambda: scrape(standby[1]).get(published, 0) >= 2, 30, "the standby's canaries")
    assert relay.wait_for(lambda got: len(got) >= mailed + 2, 30)
    assert scrape(standby[1])["clusteralert_incident_stage_active"] == 1


def test_a_canary_under_another_routing_key_is_dead_lettered_not_mailed(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Producers may not publish under the canary's routing key (a topic permission),
    but they may publish its body under an ordinary key. The stage takes a canary or a
    probe only under its own key: a forged one must not make a broken path look fine."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    # The worker sends no canary of its own (interval 0), but mails one that comes.
    extra = f'[canary]\ninterval = 0\nto = ["{CANARY_TO}"]'
    config = write_config(tmp_path, vhost, [relay], certs, extra=extra)
    _, port = start_worker(processes, config)
    forged, genuine, probe = canary_event(), canary_event(), probe_event()
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for event, key in (
            (forged, "node.1.n"),
            (probe, "node.1.n"),
            (genuine, routing_key(genuine)),  # as a worker sends it
        ):
            channel.basic_publish(EVENTS_EXCHANGE, key, encode_event(event), mandatory=True)
    assert relay.wait_for(lambda got: len(got) >= 1, 30)
    wait_until(lambda: len(dlq_list(config)) == 2, 30, "both forgeries dead-lettered")
    dead = dlq_list(config)
    assert {row["id"] for row in dead} == {forged.id, probe.id}, dead
    assert {row["reason"] for row in dead} == {"invalid_event"}
    assert _canaries(relay) == [genuine.id]
    assert scrape(port)[CANARY] == pytest.approx(genuine.time.timestamp())
