"""Notifications on the wire (strict codec) and as mails: incident, repeat, recovery and
digest forms, threading headers, and a digest of hostile events that stays small."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from shared.catalog import load_catalog
from shared.config import FilterConfig, IncidentConfig, MailConfig
from shared.errors import InvalidEvent
from shared.event import Event, encode_event, new_event
from shared.filter import Decision, decide
from shared.notification import (
    MAX_NOTIFICATION_BYTES,
    Item,
    Notification,
    decode_mail_body,
    decode_notification,
    encode_notification,
    is_notification,
    single,
)
from worker.incident import Action, IncidentEngine, Publish
from worker.render import Mail, Renderer

CATALOG = load_catalog([])
MAIL = MailConfig(sender="alerts@example.com", to=("ops@example.com",))
T0 = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)


def decider(event: Event) -> Decision:
    return decide(event, CATALOG, FilterConfig())


def ev(
    module: str, event_id: int, *, reporter: str = "node1", at: float = 0, **params: str
) -> Event:
    return new_event(
        module=module,
        event_id=event_id,
        cluster="prod",
        node=params.get("node", "db1"),
        source="test",
        reporter=reporter,
        params=params,
        time=T0 + timedelta(seconds=at),
    )


def mail_of(notification: Notification, **config: object) -> tuple[Mail, EmailMessage]:
    mail = Renderer(replace(MAIL, **config)).render_notification(notification, decider)  # type: ignore[arg-type]
    parsed = message_from_bytes(mail.data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return mail, parsed


def text(parsed: EmailMessage) -> str:
    part = parsed.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")  # type: ignore[attr-defined]


def run(engine: IncidentEngine[int], events: list[tuple[Event, float]]) -> list[Publish[int]]:
    out: list[Action[int]] = []
    for handle, (event, now) in enumerate(events):
        out += engine.tick(now)
        out += engine.offer(event, handle, now)
    out += engine.flush(events[-1][1] + 10_000)
    return [a for a in out if isinstance(a, Publish)]


def engine(**changes: object) -> IncidentEngine[int]:
    return IncidentEngine(replace(IncidentConfig(), **changes), CATALOG, FilterConfig())  # type: ignore[arg-type]


def test_incident_mail_lists_every_reporter_and_keeps_the_event_message_id() -> None:
    reports = [
        (ev("pacemaker", 1, node="node3", reporter=r, at=i), i * 0.2)
        for i, r in enumerate(["node1", "node2", "node1", "node4"])
    ]
    [sent] = run(engine(), reports)
    mail, parsed = mail_of(sent.notification)
    first = reports[0][0]
    assert parsed["Message-ID"] == f"<{first.id}@example.com>"
    assert parsed["X-Clusteralert-Kind"] == "incident" and "In-Reply-To" not in parsed
    assert "Reported by: node1 (2), node2 (1), node4 (1); 4 reports\n" in text(parsed)
    assert text(parsed).startswith("Cluster node node3 was lost.\n")
    assert parsed["Subject"] == "[error] prod node3: Cluster node node3 was lost."


def test_recovery_is_a_reply_in_the_thread_and_says_how_long() -> None:
    failure = ev("rm", 9, monitor="httpw", detail="timeout", code="11")
    recovery = ev("rm", 26, monitor="httpw", at=3725)
    failed, recovered = run(engine(), [(failure, 0), (recovery, 3725)])
    _, first = mail_of(failed.notification)
    mail, parsed = mail_of(recovered.notification)
    assert parsed["In-Reply-To"] == parsed["References"] == first["Message-ID"]
    assert parsed["Message-ID"] == f"<{recovery.id}@example.com>" != first["Message-ID"]
    body = text(parsed)
    assert "this ends the incident in this thread after 1 h 2 min 5 s" in body
    assert "Monitor httpw on db1 is back to normal." in body


def test_failure_and_recovery_in_group_wait_are_one_mail_showing_both() -> None:
    failure = ev("pacemaker", 1, node="node3")
    back = ev("pacemaker", 2, node="node3", reporter="node2", at=1.5)
    [sent] = run(engine(), [(failure, 0), (back, 1.5)])
    _, parsed = mail_of(sent.notification)
    body = text(parsed)
    assert "Already resolved after 1.5 s: Cluster node node3 is a member of the cluster." in body
    assert failure.id in body and back.id in body


def test_repeat_mail_answers_the_incident_and_counts_what_was_folded() -> None:
    # Reported every 10 minutes: folded for an hour after the mail, then mailed again.
    events = [(ev("rm", 9, monitor="m", at=t), t) for t in range(0, 4201, 600)]
    first, repeat = run(engine(), events)
    _, parsed = mail_of(repeat.notification)
    assert parsed["In-Reply-To"] == f"<{first.notification.first.id}@example.com>"
    assert "Still happening: seen 7 more time(s) since the last mail" in text(parsed)


def test_digest_subject_message_id_and_one_line_per_incident() -> None:
    stage = engine(storm_threshold=2, storm_window=10)
    events = [(ev("rm", 9, node=f"n{i}", monitor=f"m{i}", at=i / 10), i / 10) for i in range(12)]
    events.append((ev("nm", 2, server="db9", at=1.2), 1.2))
    sent = run(stage, events)
    digests = [p for p in sent if p.notification.kind == "digest"]
    [digest] = digests
    _, parsed = mail_of(digest.notification, html=True)
    first = digest.notification.first
    assert parsed["Message-ID"] == f"<digest-{first.id}@example.com>"
    assert parsed["Subject"] == "[storm] prod: 11 events in 10 s: rm:9 x10, nm:2 x1"
    lines = [line for line in text(parsed).splitlines() if line.startswith("2026-")]
    assert len(lines) == 11
    assert lines[0].split("  ") == [
        "2026-11-27 03:00:00 UTC",
        "n2",
        "error",
        "rm:9",
        "Monitor m2 on n2 found an error: {detail?} (code {code?}).",
        first.id,
    ]
    html = parsed.get_body(("html",))
    assert html is not None and "<td>rm:9</td>" in str(html.get_content())  # type: ignore[attr-defined]


def test_a_digest_of_hostile_events_stays_small_and_injects_nothing() -> None:
    """64 params of 4 KiB with CR/LF and header text each, 1,000 of them in a storm: one
    digest under the notification limit, its mail far under a relay's 10 MB limit, and
    no header added."""
    value = ("x\r\nBcc: evil@example.net\r\n" * 200)[:4096]
    hostile = ev(
        "rm", 9, monitor=value, detail=value, code=value, **{f"p{k}": value for k in range(61)}
    )
    assert len(hostile.params) == 64
    events = [
        (
            replace(
                hostile, id=str(uuid.uuid4()), params={**hostile.params, "monitor": f"m{i} {value}"}
            ),
            i / 1000,
        )
        for i in range(1000)
    ]
    stage = engine(storm_threshold=1, storm_window=60)
    sent = run(stage, events)
    assert [(p.notification.kind, len(p.notification.items)) for p in sent] == [
        ("incident", 1),
        ("digest", 999),
    ]
    for publish in sent:
        raw = encode_notification(publish.notification)
        assert len(raw) < MAX_NOTIFICATION_BYTES
        mail, parsed = mail_of(decode_notification(raw))
        assert len(mail.data) < 2_000_000
        assert "Bcc" not in parsed and parsed["To"] == "ops@example.com"
        head = mail.data.split(b"\r\n\r\n")[0]
        assert b"evil" not in head
    digest = sent[1].notification
    assert len(encode_notification(digest)) < 4 * 1024 * 1024
    shown = digest.items[0].event.params["monitor"]
    assert shown.startswith("m1 x\\r\\nBcc: evil") and "[truncated" in shown


def test_codec_round_trip_and_strict_one_line_errors() -> None:
    event = ev("rm", 9, monitor="m")
    item = Item(event, (event.id,), (("node1", 1),), replies_to=f"digest-{event.id}", duration=3)
    notification = Notification("recovery", (item,))
    raw = encode_notification(notification)
    assert is_notification(raw) and not is_notification(b'{"v":1,"id":"x"}')
    assert decode_notification(raw) == notification
    doc = json.loads(raw)
    bad: list[tuple[object, str]] = [
        ({**doc, "notification": 2}, "notification: unsupported version 2"),
        ({**doc, "kind": "alert"}, "notification kind: expected one of incident, repeat"),
        ({**doc, "items": []}, "notification items: 0 is not allowed for a recovery"),
        ({**doc, "items": [{**doc["items"][0], "ids": ["nope"]}]}, "notification items[0].ids"),
        ({**doc, "items": [{**doc["items"][0], "event": {}}]}, "notification items[0].event: "),
        ({**doc, "items": [{**doc["items"][0], "reports": True}]}, "notification items[0].reports"),
        ({**doc, "items": [{**doc["items"][0], "replies_to": None}]}, "notification: a recovery"),
        ([], "notification: expected a JSON object"),
    ]
    for value, expected in bad:
        with pytest.raises(InvalidEvent) as caught:
            decode_notification(json.dumps(value).encode())
        assert str(caught.value).startswith(expected), (expected, str(caught.value))
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidEvent, match=r"^not JSON"):
        decode_notification(b"{")
    with pytest.raises(InvalidEvent, match=r"^notification is"):
        decode_notification(b" " * (MAX_NOTIFICATION_BYTES + 1))


def test_the_mail_queue_carries_notifications_and_bare_events_from_0_1() -> None:
    event = ev("rm", 9, monitor="m")
    assert decode_mail_body(encode_event(event)) == event
    notification = single(event)
    assert decode_mail_body(encode_notification(notification)) == notification
    assert notification.summary() == "incident of 1 event(s): rm:9 x1"
    with pytest.raises(InvalidEvent, match=r"^event is 70002 bytes, at most 65536"):
        decode_mail_body(b" " * 70_000 + b"{}")
    with pytest.raises(InvalidEvent, match=r"^cluster: missing$"):
        decode_mail_body(b'{"v":1,"id":"%s","time":"2026-01-01T00:00:00Z"}' % event.id.encode())


def test_a_digest_summary_names_its_count_and_commonest_kinds() -> None:
    stage = engine(storm_threshold=1, storm_window=10)
    events = [(ev("rm", 9, node=f"n{i}", monitor=f"m{i}"), i / 10) for i in range(6)]
    events += [(ev("nm", 2, server=f"s{i}"), 0.6) for i in range(2)]
    events += [(ev("zz", 1, level="error"), 0.7), (ev("pm", 20, process="p"), 0.8)]
    digest = next(p for p in run(stage, events) if p.notification.kind == "digest")
    assert digest.notification.summary() == "digest of 8 event(s): rm:9 x5, nm:2 x2, pm:20 x1"


def test_digest_lines_say_which_incidents_ended_or_repeat() -> None:
    def item(event: Event, **extra: object) -> Item:
        return Item(event, (event.id,), (("node1", 1),), **extra)  # type: ignore[arg-type]

    failure, back = ev("rm", 9, monitor="a"), ev("rm", 26, monitor="a", at=2)
    recovered = ev("rm", 26, monitor="b")
    again = ev("rm", 9, monitor="c")
    items = (
        item(failure, resolved=item(back), duration=2),
        item(recovered, replies_to=failure.id, duration=65),
        item(again, replies_to=failure.id, since=3),
    )
    _, parsed = mail_of(Notification("digest", items, window=60))
    lines = [line.split("  ")[4] for line in text(parsed).splitlines() if line.startswith("2026")]
    assert lines == [
        "Monitor a on db1 found an error: {detail?} (code {code?}).",
        "[ends an incident after 2.0 s] Monitor a on db1 is back to normal.",
        "[ends an incident after 1 min 5 s] Monitor b on db1 is back to normal.",
        "[still happening: 4 more since the last mail] Monitor c on db1 found an error: "
        "{detail?} (code {code?}).",
    ]
    assert parsed["Subject"] == "[storm] prod: 4 events in 60 s: rm:9 x2, rm:26 x2"
