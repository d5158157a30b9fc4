"""Silences without a broker: parsing what the operator types, the refusals, the records
of the stream and the book folded from them, and the summary mail's content."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy

import pytest

from shared.catalog import load_catalog
from shared.config import FilterConfig, MailConfig
from shared.event import Event, new_event
from shared.filter import decide
from shared.silence import (
    HeldRow,
    InvalidSilence,
    Record,
    SilenceBook,
    decode_record,
    encode_record,
    held_record,
    new_silence,
    parse_duration,
    parse_until,
    summarised_record,
)
from tests.pipeline import run_cli
from worker.render import Renderer
from worker.silence_summary import summary

NOW = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)


def _event(key: str = "monitor:1", node: str = "node2", **params: str) -> Event:
    module, _, number = key.partition(":")
    return new_event(
        module=module,
        event_id=int(number),
        cluster="c",
        node=node,
        source="t",
        params=params,
        time=NOW,
    )


def _silence(*matchers: str, **options: object):  # type: ignore[no-untyped-def]
    defaults: dict[str, object] = {
        "duration": timedelta(hours=2),
        "comment": "patch",
        "author": "al",
    }
    return new_silence(matchers or ("monitor:*",), now=NOW, **{**defaults, **options})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("2h", 7200), ("1d", 86400), ("30s", 30), (" 2h ", 7200)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2 hours", "expected a duration like 90m"),
        ("90", "expected a duration like 90m"),
        ("-5m", "expected a duration like 90m"),
        ("0m", "longer than zero"),
        ("31d", "at most 30d"),
    ],
)
def test_bad_durations_are_refused_with_one_line(text: str, why: str) -> None:
    with pytest.raises(InvalidSilence, match=why) as refused:
        parse_duration(text)
    assert "\n" not in str(refused.value)


def test_until_takes_rfc3339_and_a_bare_time_is_utc() -> None:
    assert parse_until("2026-11-27T22:00:00Z") == datetime(2026, 11, 27, 22, tzinfo=UTC)
    assert parse_until("2026-11-27 22:00") == datetime(2026, 11, 27, 22, tzinfo=UTC)
    with pytest.raises(InvalidSilence, match="expected a time"):
        parse_until("tonight")


@pytest.mark.parametrize(
    ("matchers", "options", "why"),
    [
        (("monitor",), {}, "expected module:event_id"),
        (("monitor:x",), {}, "expected module:event_id"),
        (("Monitor:1",), {}, "expected module:event_id"),
        (("monitor:[12]",), {}, "expected module:event_id"),
        (("monitor:*",), {"comment": "  "}, "--comment: say why"),
        (
            ("monitor:*",),
            {"duration": None, "until": NOW - timedelta(minutes=1)},
            "not in the future",
        ),
        (("monitor:*",), {"duration": None, "until": NOW + timedelta(days=40)}, "more than 30d"),
        (("monitor:*",), {"until": NOW + timedelta(hours=1)}, "exactly one of --for and --until"),
        (("monitor:*",), {"duration": None}, "exactly one of --for and --until"),
        (("monitor:*",), {"params": {"bad key": "v"}}, "--param"),
    ],
)
def test_bad_silences_are_refused_with_one_line(
    matchers: tuple[str, ...], options: dict[str, object], why: str
) -> None:
    with pytest.raises(InvalidSilence, match=why) as refused:
        _silence(*matchers, **options)
    assert "\n" not in str(refused.value)


def test_no_pattern_is_refused() -> None:
    with pytest.raises(InvalidSilence, match="at least one"):
        new_silence((), now=NOW, duration=timedelta(hours=1), comment="c", author="a")


def test_matching_by_pattern_node_cluster_and_params() -> None:
    s = _silence("monitor:*", "pacemaker:1?", node="node2", params={"monitor": "web"})
    assert s.matches(_event("monitor:1", monitor="web"))
    assert s.matches(_event("pacemaker:12", monitor="web"))
    assert not s.matches(_event("pacemaker:2", monitor="web"))
    assert not s.matches(_event("monitor:1", node="node1", monitor="web"))
    assert not s.matches(_event("monitor:1", monitor="db"))
    assert not _silence(cluster="other").matches(_event())


def test_records_round_trip_and_the_book_folds_them() -> None:
    s = _silence(node="node2", params={"monitor": "web"})
    row = HeldRow("c", "monitor:1", "node2", 3, NOW, NOW + timedelta(minutes=5))
    records = [
        Record("add", s.id, silence=s),
        held_record(s.id, [row]),
        held_record(s.id, [HeldRow("c", "monitor:1", "node2", 2, NOW - timedelta(minutes=1), NOW)]),
        Record("expire", s.id, at=NOW + timedelta(hours=1), author="bo"),
        summarised_record(s.id),
    ]
    decoded = [decode_record(encode_record(r)) for r in records]
    assert decoded == records
    book = SilenceBook()
    for record in decoded[:4]:
        book.apply(record)
    assert book.silencing(_event(monitor="web"), NOW + timedelta(minutes=30)) == s
    assert book.silencing(_event(monitor="web"), NOW + timedelta(hours=1)) is None
    [held] = book.held(s.id)
    assert (held.count, held.first, held.last) == (5, NOW - timedelta(minutes=1), row.last)
    assert book.expired_by(s.id) == "bo"
    assert [x.id for x in book.ended_unsummarised(NOW + timedelta(hours=1))] == [s.id]
    book.apply(decoded[4])
    assert book.ended_unsummarised(NOW + timedelta(hours=3)) == []
    [listed] = book.listing(NOW, everything=True)
    assert listed["held"] == 5 and listed["expired_by"] == "bo" and listed["summarised"]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"silences": 2, "type": "add", "id": "x"}',
        b'{"silences": 1, "type": "mute", "id": "x"}',
        b'{"silences": 1, "type": "held", "id": "x", "rows": [["c", "k", "n", 0, "", ""]]}',
        b'{"silences": 1, "type": "add", "id": "x", "matchers": "monitor:*"}',
    ],
)
def test_a_record_that_is_not_one_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidSilence):
        decode_record(raw)


def test_the_summary_lists_count_first_and_last_per_kind_and_node() -> None:
    s = _silence(node="node2")
    rows = [
        HeldRow("c", "monitor:1", "node2", 7, NOW, NOW + timedelta(minutes=9)),
        HeldRow("c", "monitor:2", "node2", 1, NOW, NOW),
    ]
    notification = summary(s, rows, ended=NOW + timedelta(hours=2), expired_by=None)
    event = notification.first
    assert notification.kind == "silence"
    assert event.id == str(uuid.uuid5(uuid.UUID("5c1e4ce5-0000-4000-8000-000000000013"), s.id))
    assert "held back 8 event(s) of 2 kind(s) on 1 node(s)" in (event.text or "")
    assert event.params["held_001"] == (
        "monitor:1 on node2 (c): 7 event(s), first 2026-11-27T20:00:00Z, last 2026-11-27T20:09:00Z"
    )


def test_a_summary_of_many_rows_says_how_many_did_not_fit() -> None:
    s = _silence()
    rows = [HeldRow("c", "monitor:1", f"n{i}", 1, NOW, NOW) for i in range(100)]
    event = summary(s, rows, ended=NOW, expired_by="al").first
    assert len(event.params) == 64
    assert event.params["held_more"].startswith("37 more row(s), 37 event(s)")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["monitor", "--for", "2h", "--comment", "x"], "expected module:event_id"),
        (["monitor:*", "--for", "2h"], "--comment"),
        (["monitor:*", "--for", "soon", "--comment", "x"], "expected a duration"),
        (["monitor:*", "--until", "2020-01-01T00:00:00Z", "--comment", "x"], "not in the future"),
        (["monitor:*", "--param", "novalue", "--for", "2h", "--comment", "x"], "KEY=VALUE"),
        (["monitor:*", "--param", "monitor=", "--for", "2h", "--comment", "x"], "empty"),
        (["monitor:*", "--node=", "--for", "2h", "--comment", "x"], "--node: empty"),
        (["monitor:*", "--cluster", " ", "--for", "2h", "--comment", "x"], "--cluster: empty"),
        (["clusteralert:*", "--for", "2h", "--comment", "x"], "pipeline's own"),
    ],
)
def test_the_command_refuses_bad_input_with_one_line_and_exit_2(args: list[str], why: str) -> None:
    # No broker is needed to refuse: nothing is written.
    result = run_cli("clusteralert-worker", "silence", "add", *args, "--config", "/nonexistent")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and why in result.stderr, result.stderr


def test_the_summary_renders_as_a_silence_mail_without_reporters() -> None:
    s = _silence(node="node2")
    rows = [HeldRow("c", "monitor:1", "node2", 2, NOW, NOW + timedelta(minutes=1))]
    notification = summary(s, rows, ended=NOW + timedelta(hours=2), expired_by="bo")
    catalog = load_catalog([])
    mail = Renderer(
        MailConfig(sender="a@example.com", to=("ops@example.com",))
    ).render_notification(notification, lambda event: decide(event, catalog, FilterConfig()))
    parsed = message_from_bytes(mail.data, policy=policy.default)
    assert parsed["X-Clusteralert-Kind"] == "silence"
    assert parsed["Message-ID"] == f"<{notification.first.id}@example.com>"
    body = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "expired by bo" in body and "patch" in body
    assert "monitor:1 on node2 (c): 2 event(s)" in body
    assert "Reported by" not in body


def _add_doc(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "silences": 1,
        "type": "add",
        "id": "x",
        "matchers": ["monitor:*"],
        "start": "2026-11-27T20:00:00Z",
        "end": "2026-11-27T22:00:00Z",
        "author": "al",
        "comment": "c",
        **fields,
    }
    return json.dumps(doc).encode()


def _held_doc(count: object, first: object = "2026-11-27T20:00:00Z") -> bytes:
    row = ["c", "monitor:1", "n", count, first, "2026-11-27T20:00:00Z"]
    return json.dumps({"silences": 1, "type": "held", "id": "x", "rows": [row]}).encode()


# Whoever may write to the stream may write these: each must be skipped as one record, not
# crash the worker that folds it (every worker would, in turn) or the commands.
@pytest.mark.parametrize(
    "raw",
    [
        _add_doc(start="0001-01-01T00:00:00+05:00"),  # before year 1 in UTC
        _add_doc(end="9999-12-31T23:59:59-05:00"),  # after year 9999 in UTC
        _held_doc(1, first="0001-01-01T00:00:00+00:01"),
        b'{"silences":1,"type":"expire","id":"x","at":"0001-01-01T00:00:00+23:59"}',
        _held_doc(int("9" * 4300)),  # a sum of two no longer converts to a string
        _held_doc(2**53),
        _held_doc(1.5),
        _add_doc(silences=True),  # True == 1
        _add_doc(silences=1.0),
    ],
)
def test_a_hostile_record_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidSilence):
        decode_record(raw)


def test_times_of_records_are_kept_in_utc_and_large_counts_still_add_up() -> None:
    record = decode_record(_add_doc(start="2026-11-28T01:00:00+05:00"))
    assert record.silence is not None and record.silence.start == NOW
    assert record.silence.start.utcoffset() == timedelta(0)
    book = SilenceBook()
    book.apply(record)
    for _ in range(3):
        book.apply(decode_record(_held_doc(2**53 - 1)))
    [listed] = book.listing(NOW, everything=True)
    assert listed["held"] == 3 * (2**53 - 1)
    assert str(listed["held"])
