"""The consume/settle loop under hostile or slow conditions, with a real worker process, the
real broker and a real TLS relay: compressed and oversized bodies, messages held longer
than the broker lets a consumer keep them, and one message whose settle keeps failing
among many good ones. A fault of one message must stay that message's fault."""

from __future__ import annotations

import json
import re
import uuid
import zlib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pika
import pika.exceptions
import pytest

from shared.event import MAX_EVENT_BYTES
from shared.topology import DEAD_QUEUE, EVENTS_EXCHANGE, retry_queue_name
from tests.conftest import (
    RABBIT_HOST,
    RABBIT_PORT,
    Certs,
    Process,
    amqp_url,
    scrape,
    wait_metric,
)
from tests.pipeline import (
    dlq_list,
    publish_events,
    received_ids,
    set_queue_policy,
    start_worker,
    write_config,
)
from tests.tcpproxy import TcpProxy
from tests.test_faults import CREDENTIALS, Processes, Servers, duplicates
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def publish_raw(
    vhost: str, body: bytes, headers: dict[str, object] | None = None, message_id: str = ""
) -> None:
    """One message as any AMQP client could send it, confirmed by the broker."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            EVENTS_EXCHANGE,
            "node.1.n",
            body,
            mandatory=True,
            properties=pika.BasicProperties(
                delivery_mode=2, headers=headers, message_id=message_id or None
            ),
        )


def zlib_bomb(expanded_mib: int) -> bytes:
    """A zlib stream that inflates to ``expanded_mib`` MiB of zeros (about 1000:1),
    built a MiB at a time so the test itself stays small."""
    compressor = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(expanded_mib)]
    parts.append(compressor.flush())
    return b"".join(parts)


def peak_rss_mib(process: Process) -> float:
    """The process's high-water mark of resident memory, from the kernel."""
    status = Path(f"/proc/{process.proc.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def reconnects(worker: Process) -> int:
    return worker.output().count("broker connection failed")


def event_body(event_id: str) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "id": event_id,
            "time": datetime.now(UTC).isoformat(),
            "cluster": "c",
            "node": "n",
            "module": "node",
            "event_id": 1,
            "params": {"server": "srv"},
            "source": "test",
        }
    ).encode()


def test_compressed_and_oversized_bodies_are_dead_lettered_once_without_a_reconnect(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, port = start_worker(processes, config)
    # One bomb small enough to pass the size check (the compression header refuses
    # it), one past it (refused for its size before anything reads it), and a plain
    # body past it.
    small_bomb, big_bomb = zlib_bomb(60), zlib_bomb(200)
    assert len(small_bomb) < MAX_EVENT_BYTES < len(big_bomb) < 256 * 1024
    bad = {str(uuid.uuid4()): body for body in (small_bomb, big_bomb)}
    for event_id, body in bad.items():
        publish_raw(vhost, body, {"compression": "application/x-gzip"}, event_id)
    oversized_id = str(uuid.uuid4())
    publish_raw(vhost, b"{" + b" " * (200 * 1024) + b"}", message_id=oversized_id)
    bad[oversized_id] = b""
    good_id = str(uuid.uuid4())
    publish_raw(vhost, event_body(good_id), message_id=good_id)

    assert relay.wait_for(lambda got: len(got) == 1, timeout=30), worker.output()[-3000:]
    assert received_ids(relay) == [good_id]
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="invalid_event"}', lambda v: v == 3, 10
    )
    rows = {str(r["id"]): r for r in dlq_list(config)}
    assert sorted(rows) == sorted(bad)
    assert {r["reason"] for r in rows.values()} == {"invalid_event"}
    assert "compressed bodies are not accepted" in str(rows[next(iter(bad))]["last_error"])
    metrics = scrape(port)
    assert metrics["clusteralert_events_consumed_total"] == 4  # each delivered once
    assert metrics["clusteralert_broker_connected"] == 1
    assert reconnects(worker) == 0, worker.output()[-3000:]
    # ...that must never be inflated: the worker idles at about 35 MiB.
    peak = peak_rss_mib(worker)
    print(f"\nworker peak RSS {peak:.0f} MiB after two zlib bombs")
    assert peak < 100


def test_messages_held_past_max_hold_go_to_the_retry_ladder(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    # One connection and 0.8 s per mail: of 6 prefetched mails, about two fit in the
    # 2 s budget; the rest must not wait their turn (in production, past the broker's
    # consumer ack timeout) but go to the retry ladder.
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 0.8
    extra = "max_connections = 1\n\n[worker]\nmax_hold = 2\n"
    config = write_config(tmp_path, vhost, [relay], certs, extra=extra)
    worker, port = start_worker(processes, config)
    ids = publish_events(vhost, 6)

    def settled() -> bool:
        metrics = scrape(port)
        sent = metrics.get(f'clusteralert_mails_sent_total{{relay="127.0.0.1:{relay.port}"}}')
        delayed = metrics.get('clusteralert_retries_total{stage="delayed"}')
        return sent is not None and delayed is not None and sent + delayed >= 6

    wait_until(settled, 15, "every mail sent or moved to the retry ladder")
    metrics = scrape(port)
    delayed = metrics['clusteralert_retries_total{stage="delayed"}']
    print(f"\n{len(relay.received)} mailed, {delayed:.0f} moved to the retry ladder")
    assert 2 <= delayed <= 5, worker.output()[-3000:]
    assert metrics["clusteralert_in_flight"] == 0
    parked = peek_queue(vhost, retry_queue_name("30s"))
    assert len(parked) == delayed
    assert {headers["x-clusteralert-reason"] for headers in parked.values()} == {"timeout"}
    # Nothing lost: every event was either mailed or is waiting on the ladder.
    assert set(received_ids(relay)) | set(parked) == set(ids)
    assert dlq_list(config) == []
    assert reconnects(worker) == 0
    assert "not delivered within 2s" in worker.output()


def peek_queue(vhost: str, queue: str) -> dict[str, dict[str, object]]:
    """Message id -> headers of everything in ``queue``, all given back unacked."""
    seen: dict[str, dict[str, object]] = {}
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            seen[str(properties.message_id)] = dict(properties.headers or {})
    return seen


def refuse_dead_letters(vhost: str) -> None:
    """Make the DLQ full and refusing (a policy, as an operator might set): every dead
    letter the worker publishes from now on is nacked by the broker."""
    set_queue_policy(
        vhost,
        "full-dlq",
        f"^{re.escape(DEAD_QUEUE)}$",
        {"max-length": 0, "overflow": "reject-publish"},
    )
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()

        def nacked() -> bool:
            # The first filler fits (the queue was empty); once the policy applies and
            # the queue holds it, the broker refuses the next.
            try:
                channel.basic_publish("", DEAD_QUEUE, b"filler", mandatory=True)
            except pika.exceptions.NackError:
                return True
            return False

        wait_until(nacked, 30, f"policy refusing publishes to {DEAD_QUEUE}")


def test_a_message_whose_settle_fails_does_not_charge_the_others(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 0.02  # keeps the prefetch window full of good mails
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, port = start_worker(processes, config)
    refuse_dead_letters(vhost)
    good = publish_events(vhost, 40)
    poison_id = str(uuid.uuid4())
    publish_raw(vhost, b"not an event", message_id=poison_id)
    good += publish_events(vhost, 40)

    assert relay.wait_for(lambda got: set(good) <= set(received_ids(got)), timeout=60), (
        worker.output()[-3000:]
    )

    counts = Counter(received_ids(relay))
    print(
        f"\n{len(relay.received)} mails for {len(good)} good events, "
        f"{scrape(port)['clusteralert_events_consumed_total']:.0f} deliveries, "
        f"{reconnects(worker)} reconnects"
    )
    assert max(counts.values()) == 1  # no good mail was sent twice
    assert reconnects(worker) == 0, worker.output()[-3000:]

    # The poison is tried until the work queue's delivery limit takes it from us.
    def poison_tries() -> int:
        return worker.output().count(f"could not settle message '{poison_id}'")

    def only_the_poison_came_back() -> bool:
        # Every delivery beyond one per good event was the poison coming back: no good
        # message was ever returned to the queue, so none was charged a delivery. (Read
        # the log first: a poison delivery is counted before its failed settle is logged.)
        tries = poison_tries()
        consumed = scrape(port)["clusteralert_events_consumed_total"]
        return tries >= 20 and consumed == len(good) + tries

    wait_until(only_the_poison_came_back, 30, "the poison, and only it, reaching its limit")
    metrics = scrape(port)
    assert metrics["clusteralert_broker_connected"] == 1


def test_a_lost_connection_stops_the_sends_it_can_no_longer_settle(
    tmp_path: Path, vhost: str, certs: Certs, smtp_server: Servers, processes: Processes
) -> None:
    # The broker hands every unacked message of a lost connection to the next consumer
    # (here, the same worker reconnected). Sends still running for them would mail each
    # a second time. Only two kinds may still arrive twice: mails inside DATA at the cut,
    # and mails accepted just before it whose ack had not gone out yet; each is at most
    # one per relay connection (4), as a mail takes 0.3 s.
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    relay.handler.data_delay = 0.3
    config = write_config(tmp_path, vhost, [relay], certs)
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    try:
        config.write_text(config.read_text().replace(f":{RABBIT_PORT}/", f":{proxy.port}/"))
        worker, port = start_worker(processes, config)
        ids = publish_events(vhost, 24)
        assert relay.wait_for(lambda got: len(got) >= 2, timeout=30)
        proxy.cut()
        assert relay.wait_for(lambda got: set(ids) <= set(received_ids(got)), timeout=60), (
            worker.output()[-3000:]
        )
        wait_metric(port, "clusteralert_broker_connected", lambda v: v == 1, 30)
        wait_metric(port, "clusteralert_in_flight", lambda v: v == 0, 30)
    finally:
        proxy.close()
    print(f"\nconnection cut: {len(relay.received)} mails for {len(ids)} events")
    assert reconnects(worker) >= 1 and proxy.accepted >= 2
    assert duplicates(relay) <= 8
