"""Bundles: several notifications in one message on the mail queue. The wire form and the
bookkeeping are unit-tested; the delivery stage's handling of a bundle (mailed part by
part, a refused part dead-lettered alone, a bundle that comes back split, a bundle
dead-lettered whole listed and replayed) runs against a real RabbitMQ, real worker
processes and a real TLS relay."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import amqp
import pika
import pytest

from shared.config import IncidentConfig
from shared.errors import InvalidEvent
from shared.event import new_event
from shared.notification import (
    MAX_BUNDLE,
    decode_notification,
    encode_bundle,
    encode_notification,
    is_bundle,
    single,
    split_bundle,
)
from tests.conftest import Certs, Process, amqp_url, wait_metric
from tests.pipeline import (
    SMTP_PASSWORD,
    dlq,
    dlq_list,
    queue_depth,
    start_worker,
    write_config,
)
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until
from worker.broker import Delivery, Outgoing
from worker.bundle import Part, parts_of, republished, whole_deliveries
from worker.dlq import DeadMessage
from worker.incident_stage import BUNDLE_CONTENT_TYPE, IncidentStage, bundle_size


def _parts(count: int, *, text: str = "") -> list[tuple[str, bytes]]:
    """(message id, encoded notification) of ``count`` one-event notifications."""
    parts = []
    for i in range(count):
        event = new_event(
            module="node",
            event_id=1,
            cluster="c",
            node=f"n{i}",
            source="test",
            params={"server": f"srv{i}", "note": text},
            time=datetime.now(UTC),
        )
        parts.append((event.id, encode_notification(single(event))))
    return parts


# -- the wire form -----------------------------------------------------------------------------


def test_a_bundle_splits_into_the_very_bytes_of_its_parts() -> None:
    # A value with a line feed, a line separator and non-ASCII: still one line per part.
    parts = _parts(3, text="two\nlines\u2028and ü")
    raw = encode_bundle(parts)
    assert is_bundle(raw)
    assert not is_bundle(parts[0][1])
    bundle = split_bundle(raw)
    assert bundle.ids == tuple(i for i, _ in parts)
    assert bundle.parts == tuple(b for _, b in parts)
    # The event codec shows line breaks as text, and the parts carry the value intact.
    note = decode_notification(bundle.parts[1]).first.params["note"]
    assert note == "two\\nlines\\u2028and ü"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"bundle":1,"ids":[]}', "1 to 16"),
        (b'{"bundle":2,"ids":["x"]}\n{}', "unsupported version"),
        (b'{"bundle":true,"ids":["x"]}\n{}', "unsupported version"),
        (b'["bundle"]\n{}', "unsupported version"),
        (b'{"bundle":1,"ids":\n{}', "not JSON"),
        (b'{"bundle":1,"ids":["%s"]}' % str(uuid.uuid4()).encode(), "1 ids but 0 parts"),
        (b'{"bundle":1,"ids":["../../etc"]}\n{}', "not an event id"),
        (b'{"bundle":1,"ids":[7]}\n{}', "not an event id"),
        (b'{"bundle":1,"ids":["\xff"]}\n{}', "not JSON"),
    ],
)
def test_bad_framing_is_one_line_and_refuses_the_whole(raw: bytes, why: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        split_bundle(raw)
    assert why in str(caught.value)
    assert "\n" not in str(caught.value)


def test_more_parts_than_a_bundle_may_hold_are_refused() -> None:
    with pytest.raises(InvalidEvent, match="1 to 16"):
        split_bundle(encode_bundle(_parts(MAX_BUNDLE + 1)))


# -- the stage's side: what goes out in one message --------------------------------------------


class _Recorder:
    """Confirms everything except the messages whose index is in ``refuse``."""

    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.sent: list[Outgoing] = []
        self.refuse = refuse

    def publish_each_confirmed(self, messages: list[Outgoing]) -> list[str | None]:
        start = len(self.sent)
        self.sent += messages
        return ["nack" if start + i in self.refuse else None for i in range(len(messages))]


def _stage(bundle: int, broker: _Recorder) -> IncidentStage:
    stage = IncidentStage.__new__(IncidentStage)  # only what _publish uses
    stage.config = IncidentConfig(bundle=bundle)
    stage.broker = broker  # type: ignore[assignment]
    return stage


def _outgoing(parts: list[tuple[str, bytes]]) -> list[Outgoing]:
    return [
        Outgoing(body, {"message_id": mid, "delivery_mode": 2}, "", "clusteralert.mail")
        for mid, body in parts
    ]


def test_the_stage_bundles_runs_of_its_notifications_and_a_large_one_goes_alone() -> None:
    parts = _parts(7)
    parts.insert(3, _parts(1, text="x" * 3000)[0])  # one that alone tips the byte limit
    big = _outgoing(parts)
    big[3] = big[3]._replace(body=big[3].body + b" " * 300_000)
    broker = _Recorder(refuse=frozenset({1}))
    failures = _stage(3, broker)._publish(big)

    sizes = [len(split_bundle(m.body).parts) if is_bundle(m.body) else 1 for m in broker.sent]
    assert sizes == [3, 1, 3, 1]
    first = broker.sent[0]
    assert first.properties["content_type"] == BUNDLE_CONTENT_TYPE
    assert first.properties["message_id"] == parts[0][0]
    assert first.routing_key == "clusteralert.mail"
    assert split_bundle(first.body).parts == tuple(b for _, b in parts[:3])
    # A refused message refuses each notification in it, and only those.
    assert failures == [None] * 3 + ["nack"] + [None] * 4


def test_bundle_1_publishes_each_notification_as_before() -> None:
    broker = _Recorder()
    assert _stage(1, broker)._publish(_outgoing(_parts(3))) == [None] * 3
    assert [is_bundle(m.body) for m in broker.sent] == [False] * 3


# -- the worker's side: a part settles, the bundle is acked once -----------------------------


class _Channel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.calls.append(("ack", tag))

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.calls.append(("requeue", tag))


def _delivery(body: bytes, channel: _Channel, *, redelivered: bool = False) -> Delivery:
    raw = amqp.Message(
        body, message_id="m", application_headers={"x-clusteralert-replayed": 1, "x-death": []}
    )
    raw.channel = channel
    raw.delivery_info = {"delivery_tag": 5, "redelivered": redelivered, "routing_key": "k"}
    return Delivery(raw, 0.0)


def test_the_bundle_is_acked_when_its_last_part_is_settled_and_not_before() -> None:
    channel = _Channel()
    parts = _parts(3)
    got = parts_of(_delivery(encode_bundle(parts), channel))
    assert got is not None
    assert [(p.properties["message_id"], p.body) for p in got] == parts
    assert all(p.properties["content_type"] == "application/json" for p in got)
    assert whole_deliveries([got[0]]) == []
    got[2].ack()  # a retry or dead letter confirmed
    assert channel.calls == []
    [whole] = whole_deliveries([got[1]])
    assert whole.delivery_tag == 5 and not isinstance(whole, Part)


def test_a_part_that_found_no_home_gives_the_whole_bundle_back() -> None:
    channel = _Channel()
    got = parts_of(_delivery(encode_bundle(_parts(2)), channel))
    assert got is not None
    got[0].requeue()
    assert channel.calls == []
    assert whole_deliveries([got[1]]) == []
    assert channel.calls == [("requeue", 5)]


def test_bad_framing_is_no_parts_and_a_redelivered_bundle_keeps_only_our_headers() -> None:
    channel = _Channel()
    assert parts_of(_delivery(b'{"bundle":1,"ids":[]}', channel)) is None
    parts = _parts(2)
    outgoing = republished(_delivery(encode_bundle(parts), channel, redelivered=True))
    assert outgoing is not None
    assert [(o.properties["message_id"], o.body) for o in outgoing] == parts
    assert outgoing[0].properties["application_headers"] == {"x-clusteralert-replayed": 1}
    assert outgoing[0].routing_key == "clusteralert.mail" and outgoing[0].exchange == ""


# -- the worker, for real ----------------------------------------------------------------------


def _publish_raw(vhost: str, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            routing_key,
            body,
            pika.BasicProperties(delivery_mode=2, **props),
            mandatory=True,
        )


def _worker(
    tmp_path: Path,
    vhost: str,
    relay: SmtpServer,
    certs: Certs,
    processes: Callable[..., Process],
) -> tuple[Process, int, Path]:
    config = write_config(tmp_path, vhost, [relay], certs)
    worker, port = start_worker(processes, config)
    return worker, port, config


def test_a_bundle_is_mailed_part_by_part_and_a_refused_part_is_dead_lettered_alone(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    relay.handler.data_replies = ["550 5.7.1 refused"]  # the first mail to reach DATA
    worker, port, _ = _worker(tmp_path, vhost, relay, certs, processes)
    parts = _parts(4)
    _publish_raw(vhost, "", "clusteralert.mail", encode_bundle(parts), message_id=parts[0][0])

    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 1, 20
    )
    assert relay.wait_for(lambda got: len(got) == 3, timeout=20)
    worker.stop()
    assert queue_depth(vhost) == 0  # the bundle was acked
    mailed = {m.event_id for m in relay.received}
    [refused] = {mid for mid, _ in parts} - mailed
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        method, properties, body = connection.channel().basic_get(
            "clusteralert.dead", auto_ack=True
        )
    assert method is not None
    assert properties.message_id == refused
    assert body == dict(parts)[refused]  # the part's own bytes, a plain notification


def test_a_bundle_that_comes_back_is_split_into_messages_of_its_own(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    parts, more = _parts(3), _parts(2)
    config = write_config(tmp_path, vhost, [relay], certs)
    # Declared by a first start; then the bundles are taken and given back, as a worker
    # that died holding them would.
    worker, _ = start_worker(processes, config)
    worker.stop()
    for bundle in (parts, more):
        _publish_raw(vhost, "", "clusteralert.mail", encode_bundle(bundle), message_id=bundle[0][0])
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2)
        taken = []
        for method, _, _ in channel.consume("clusteralert.mail", inactivity_timeout=10):
            assert method is not None and not method.redelivered
            taken.append(method.delivery_tag)
            if len(taken) == 2:
                break
        channel.basic_nack(taken[-1], multiple=True, requeue=True)

    worker, _ = start_worker(processes, config)
    assert relay.wait_for(lambda got: len(got) == 5, timeout=20)
    every = sorted(mid for mid, _ in parts + more)
    assert sorted(m.event_id for m in relay.received) == every

    def split_logged() -> bool:
        out = worker.output()
        return "into its 3 notifications" in out and "into its 2 notifications" in out

    wait_until(split_logged, 10, "both splits logged")
    worker.stop()
    assert queue_depth(vhost) == 0


def test_a_bundle_dead_lettered_whole_lists_its_events_and_replays(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    worker, _, config = _worker(tmp_path, vhost, relay, certs, processes)
    parts = _parts(3)
    # As RabbitMQ dead-letters a message past the queue's delivery limit.
    _publish_raw(
        vhost,
        "clusteralert.dlx",
        "",
        encode_bundle(parts),
        message_id=parts[0][0],
        headers={"x-first-death-reason": "delivery_limit"},
    )
    [row] = dlq_list(config)
    assert row["reason"] == "delivery_limit"
    assert row["notification"] == (
        "bundle of 3 notifications, the first a incident of 1 event(s): node:1 x1"
    )
    shown = dlq(config, "show", parts[2][0])  # found by any event it covers
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["event_ids"] == [mid for mid, _ in parts]

    replay = dlq(config, "replay")
    assert replay.returncode == 0, replay.stderr
    assert relay.wait_for(lambda got: len(got) == 3, timeout=20)
    assert sorted(m.event_id for m in relay.received) == sorted(mid for mid, _ in parts)
    worker.stop()
    assert queue_depth(vhost, "clusteralert.dead") == 0


def test_a_slow_relay_gets_smaller_bundles_so_what_a_worker_holds_goes_out_in_time() -> None:
    size = functools.partial(bundle_size, 8, prefetch=32, max_hold=600)
    assert size(rates=[]) == 8
    assert size(rates=[0.0, 0.0]) == 8  # no limit anywhere
    assert size(rates=[1.0]) == 8  # 32 x 8 = 256 mails in 256 s: within 300
    assert size(rates=[0.0, 0.5]) == 4  # the slowest relay counts: 150 mails in 300 s
    assert size(rates=[0.1]) == 1  # never below one per message
    assert bundle_size(8, prefetch=1, max_hold=600, rates=[0.02]) == 6


def test_a_dead_bundle_with_an_unreadable_part_still_shows_the_others() -> None:
    parts = _parts(2)
    body = encode_bundle([parts[0], (str(uuid.uuid4()), b'{"notification":1}'), parts[1]])
    raw = amqp.Message(body, message_id=parts[0][0], application_headers={})
    dead = DeadMessage.from_message(raw)
    assert dead.notification.startswith("bundle of 3 notifications (1 unreadable), the first a ")
    assert dead.events == (parts[0][0], parts[1][0])
    assert dead.node == "n0"
