"""The event codec: structural faults are refused with a reason, dirt is cleaned."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from shared.errors import InvalidEvent
from shared.event import (
    MAX_EVENT_BYTES,
    MAX_PARAM_BYTES,
    decode_event,
    encode_event,
    new_event,
    peek_event,
    routing_key,
)


def wire(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "v": 1,
        "id": str(uuid.uuid4()),
        "time": "2026-11-26T03:00:00.5Z",
        "cluster": "c1",
        "node": "node1.example.com",
        "module": "rm",
        "event_id": 9,
        "level": "error",
        "params": {"1": "httpw"},
        "source": "cli",
    }
    doc.update(overrides)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def test_round_trip_keeps_every_field() -> None:
    event = new_event(
        module="rm",
        event_id=9,
        cluster="c1",
        node="n1",
        source="cli",
        level="warning",
        params={"monitor": "httpw", "1": "x"},
        text="free text",
    )
    again = decode_event(encode_event(event))
    assert again == event
    assert again.time.tzinfo is not None


def test_time_is_normalised_to_utc() -> None:
    event = decode_event(wire(time="2026-11-26T12:00:00+09:00"))
    assert event.time == datetime(2026, 11, 26, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"module": ...}, "module: missing"),
        ({"event_id": "9"}, "event_id: expected int, got str"),
        ({"event_id": True}, "event_id: expected int, got bool"),
        ({"event_id": -1}, "event_id: expected an integer from 0 to"),
        ({"event_id": 2**63}, "event_id: expected an integer from 0 to"),
        ({"time": "9999-12-31T23:59:59-01:00"}, "time: not an RFC 3339 timestamp"),
        ({"module": "RM"}, "module: 'RM' must match"),
        ({"params": ["a"]}, "params: expected object, got list"),
        ({"params": {"a": 1}}, "params.a: expected a string, got int"),
        ({"params": {"bad key": "x"}}, "params: key 'bad key'"),
        ({"params": {f"k{i}": "x" for i in range(65)}}, "params: 65 keys, at most 64"),
        ({"time": "yesterday"}, "time: not an RFC 3339 timestamp"),
        ({"time": "2026-11-26T03:00:00"}, "time: timestamp has no UTC offset"),
        ({"id": "not-a-uuid"}, "id: not a UUID"),
        ({"v": 2}, "v: unsupported schema version 2"),
        ({"node": None}, "node: expected str, got NoneType"),
    ],
)
def test_structural_faults_are_refused_with_a_reason(
    overrides: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(wire(**overrides))
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_levels_are_mapped_or_dropped_not_refused() -> None:
    assert decode_event(wire(level="FATAL")).level == "error"
    assert decode_event(wire(level="warn")).level == "warning"
    assert decode_event(wire(level="bogus")).level is None
    assert decode_event(wire(level=3)).level is None


def test_a_number_too_long_to_parse_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match="not JSON"):
        decode_event(wire(event_id=0).replace(b'"event_id": 0', b'"event_id": ' + b"9" * 5000))


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(InvalidEvent, match="not JSON"):
        decode_event(b"{nope")
    with pytest.raises(InvalidEvent, match="expected a JSON object, got list"):
        decode_event(b"[]")


def test_oversized_wire_event_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="at most 65536"):
        decode_event(wire(text="x" * MAX_EVENT_BYTES))


def test_control_characters_are_escaped_visibly() -> None:
    event = decode_event(
        wire(
            node="n1\r\nBcc: evil@example.com",
            params={"detail": "a\nb\x00c\x1b[31m\u2028"},
            text="t\x7f",
        )
    )
    assert event.node == "n1\\r\\nBcc: evil@example.com"
    assert event.params["detail"] == "a\\nb\\x00c\\x1b[31m\\u2028"
    assert event.text == "t\\x7f"


def test_invalid_utf8_and_lone_surrogates_become_replacement_characters() -> None:
    raw = wire(node="PLACEHOLDER").replace(b"PLACEHOLDER", b"n\xff\xfe1")
    assert decode_event(raw).node == "n\ufffd\ufffd1"
    raw = wire(node="PLACEHOLDER").replace(b"PLACEHOLDER", b"a\\udc80b")
    assert decode_event(raw).node == "a\ufffdb"


def test_huge_params_are_truncated_with_a_marker_and_fit_the_wire_limit() -> None:
    event = new_event(
        module="rm",
        event_id=9,
        cluster="c",
        node="n",
        source="cli",
        params={"big": "x" * 1_000_000, **{f"p{i}": "y" * 5000 for i in range(40)}},
    )
    assert len(encode_event(event)) <= MAX_EVENT_BYTES
    assert "[truncated, 1000000 bytes]" in event.params["big"]
    assert set(event.params) == {"big", *(f"p{i}" for i in range(40))}
    assert decode_event(encode_event(event)) == event


def test_each_param_value_is_cut_to_its_byte_limit_even_when_the_event_is_small() -> None:
    """The 4 KiB limit is per value and counts UTF-8 bytes: 2,000 characters of three
    bytes each are 6,000 bytes, over it, although they are fewer characters."""
    event = new_event(
        module="rm",
        event_id=9,
        cluster="c",
        node="n",
        source="cli",
        params={"wide": "\u3042" * 2000, "long": "z" * 5000, "short": "\u3042" * 1000},
    )
    for name, size in (("wide", 6000), ("long", 5000)):
        value = event.params[name]
        assert len(value.encode("utf-8")) <= MAX_PARAM_BYTES
        assert value.endswith(f" [truncated, {size} bytes]")
    assert event.params["short"] == "\u3042" * 1000  # 3,000 bytes: kept whole
    assert decode_event(encode_event(event)) == event


def test_long_names_are_cut_with_a_marker() -> None:
    event = new_event(module="rm", event_id=1, cluster="c" * 300, node="n", source="cli")
    assert len(event.cluster) == 255
    assert event.cluster.endswith("[truncated]")


def test_routing_key_replaces_dots_in_the_node() -> None:
    event = decode_event(wire())
    assert peek_event(encode_event(event))[1] == "rm.9.node1_example_com"
    long = new_event(module="rm", event_id=1, cluster="c", node="\u00e9" * 255, source="cli")
    assert len(peek_event(encode_event(long))[1].encode()) <= 255
    # Events published from objects (heartbeats, the canary) get the same key as spooled ones.
    assert routing_key(event) == "rm.9.node1_example_com"
    assert routing_key(long) == peek_event(encode_event(long))[1]


def test_peek_event_reads_what_publishing_needs_and_refuses_the_rest() -> None:
    from shared.event import MAX_EVENT_BYTES, InvalidEvent

    event = new_event(module="rm", event_id=7, cluster="c", node="db.1", source="t")
    assert peek_event(encode_event(event)) == (event.id, "rm.7.db_1")
    good = json.loads(encode_event(event))
    cases = {
        b"x" * (MAX_EVENT_BYTES + 1): f"at most {MAX_EVENT_BYTES} allowed",
        b"{nope": "not JSON: ",
        b"[1]": "not a version 1 event object",
        json.dumps({**good, "v": 2}).encode(): "not a version 1 event object",
        json.dumps({**good, "id": "short"}).encode(): "id: not a UUID",
        json.dumps({**good, "id": 5}).encode(): "id: not a UUID",
        json.dumps({**good, "module": "Bad Module"}).encode(): "module: missing or invalid",
        json.dumps({**good, "module": None}).encode(): "module: missing or invalid",
        json.dumps({**good, "event_id": True}).encode(): "event_id: missing or invalid",
        json.dumps({**good, "event_id": -1}).encode(): "event_id: missing or invalid",
        json.dumps({**good, "event_id": "7"}).encode(): "event_id: missing or invalid",
        json.dumps({**good, "node": 3}).encode(): "node: missing or invalid",
    }
    for raw, message in cases.items():
        with pytest.raises(InvalidEvent) as info:
            peek_event(raw)
        assert message in str(info.value), (raw[:80], str(info.value))
    # event_id 0 is a real id.
    assert peek_event(json.dumps({**good, "event_id": 0}).encode())[1] == "rm.0.db_1"


def test_routing_keys_fit_amqps_255_bytes_without_splitting_a_character() -> None:
    event = new_event(module="rm", event_id=1, cluster="c", node="ノ" * 200, source="t")
    key = peek_event(encode_event(event))[1]
    assert len(key.encode()) <= 255 and key.startswith("rm.1.ノ")
    assert len(key.encode()) > 250  # cut at the bound, not far short of it
