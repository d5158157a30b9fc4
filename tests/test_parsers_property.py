"""Property tests for every parser of untrusted input: the wire event decoder, the config
reader and the vendor CSV reader. Over arbitrary bytes and hostile structures (deep
nesting, huge values, every script, control characters), each either succeeds or fails
with our own one-line error, never another exception and never a hang; where a round trip
exists, it holds."""

from __future__ import annotations

import json
import string
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.catalog import decode_csv
from shared.config import SECTIONS, parse_config
from shared.errors import ConfigError, InvalidEvent, Problem
from shared.event import MAX_EVENT_BYTES, Event, decode_event, encode_event, new_event
from shared.vendor_csv import COLUMNS, parse_vendor_csv

# A per-example deadline is the hang check: a parser that loops or backtracks badly on
# some input fails here instead of stalling the suite.
BOUNDED = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(codec="utf-8")),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
NESTED = ["[" * 100_000, '{"a":' * 50_000, "[" * 2000 + "]" * 2000]
HUGE = ['{"v":1,"event_id":' + "9" * 5000 + "}", '"' + "x" * (MAX_EVENT_BYTES + 1) + '"']


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text and "\r" not in text


def decode_or_error(raw: bytes) -> Event | None:
    try:
        return decode_event(raw)
    except InvalidEvent as exc:
        assert one_line(str(exc)), repr(str(exc))
        return None


@BOUNDED
@given(st.binary(max_size=2000))
@example(b"\xff\xfe\x00{")
@example(b'{"v":1}' + b"\x00" * 100)
def test_decoding_arbitrary_bytes_gives_an_event_or_one_line(raw: bytes) -> None:
    decode_or_error(raw)


@BOUNDED
@given(st.sampled_from(NESTED + HUGE).map(str.encode))
def test_deep_and_huge_documents_are_refused_in_one_line(raw: bytes) -> None:
    assert decode_or_error(raw) is None


def wire_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Documents with the real field names, each holding a valid value or any JSON."""
    valid: dict[str, st.SearchStrategy[Any]] = {
        "v": st.just(1),
        "id": st.uuids().map(str),
        "time": st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat()),
        "cluster": st.text(max_size=100),
        "node": st.text(max_size=100),
        "module": st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True),
        "event_id": st.integers(min_value=0, max_value=2**31),
        "source": st.text(max_size=20),
        "level": st.sampled_from(["info", "warning", "error", "debug", ""]),
        "params": st.dictionaries(st.text(max_size=40), st.text(max_size=200), max_size=40),
        "text": st.text(max_size=2000),
    }
    return st.fixed_dictionaries(
        {}, optional={name: strategy | JSON for name, strategy in valid.items()}
    )


@BOUNDED
@given(wire_fields())
def test_hostile_field_values_decode_or_fail_in_one_line(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    event = decode_or_error(raw)
    if event is not None:
        # What decodes is a fixed point: encoding and decoding it again changes nothing.
        assert decode_event(encode_event(event)) == event
        assert len(encode_event(event)) <= MAX_EVENT_BYTES


@BOUNDED
@given(
    cluster=st.text(max_size=200),
    node=st.text(max_size=200),
    module=st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True),
    event_id=st.integers(min_value=0, max_value=2**31),
    level=st.sampled_from([None, "info", "warning", "error"]),
    text=st.none() | st.text(max_size=3000),
    params=st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True), st.text(max_size=500), max_size=20
    ),
    when=st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
    ),
)
def test_every_event_we_make_survives_the_wire(
    cluster: str,
    node: str,
    module: str,
    event_id: int,
    level: str | None,
    text: str | None,
    params: dict[str, str],
    when: datetime,
) -> None:
    event = new_event(
        module=module,
        event_id=event_id,
        cluster=cluster,
        node=node,
        source="property",
        level=level,
        text=text,
        params=params,
        time=when,
    )
    assert decode_event(encode_event(event)) == event


# ---- the config reader ----------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "urls",
        "password_file",
        "heartbeat",
        "spool_dir",
        "max_events",
        "from",
        "to",
        "subject",
        "charset",
        "host",
        "port",
        "security",
        "timeout",
        "min_level",
        "enable",
        "disable",
        "unknown",
        "path",
        "prefetch",
        "retry_window",
        "match",
        "patterns",
        "colour",
    ]
)
TOML_VALUE = st.recursive(
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["amqp://u@h/v", "amqps://:@/", "rm:*", "[", "(?P<module>x", "~"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)
TABLE = st.dictionaries(KEYS, TOML_VALUE, max_size=6)
DOCUMENT = st.dictionaries(
    st.sampled_from([*SECTIONS, "route", "bogus"]),
    TABLE | st.lists(TABLE, max_size=3) | TOML_VALUE,
    max_size=6,
)


def check_problems(problems: list[Problem] | tuple[Problem, ...]) -> None:
    for problem in problems:
        assert one_line(str(problem)), repr(str(problem))


@BOUNDED
@given(DOCUMENT)
def test_hostile_config_structures_give_problems_not_exceptions(data: dict[str, Any]) -> None:
    base = Path("/nonexistent-clusteralert-base")
    try:
        config = parse_config(data, base=base)
    except ConfigError as exc:
        assert exc.problems
        check_problems(exc.problems)
        assert one_line(str(exc).splitlines()[0])
    else:
        check_problems(config.warnings)


@BOUNDED
@given(st.text(alphabet=string.printable + "[]=\"'{}ー\u2028", max_size=400))
def test_arbitrary_config_text_is_toml_or_one_clear_error(text: str) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # load_config reports this as one problem: tested in test_config.py
    try:
        parse_config(data, base=Path("/nonexistent-clusteralert-base"))
    except ConfigError as exc:
        check_problems(exc.problems)


# ---- the vendor CSV reader -------------------------------------------------------------

CELL = st.text(max_size=60) | st.sampled_from(
    ["", "%1", "%s%%", "<b>x</b>", "<script>", "Error", "warning", "=cmd|' /C calc'!A0", "\r\n"]
)


def csv_text(rows: list[list[str]]) -> str:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


@BOUNDED
@given(st.lists(st.lists(CELL, min_size=0, max_size=9), max_size=12))
def test_hostile_vendor_rows_give_a_catalog_and_one_line_problems(rows: list[list[str]]) -> None:
    problems: list[Problem] = []
    catalog = parse_vendor_csv(csv_text([list(COLUMNS), *rows]), "list.csv", problems)
    check_problems(problems)
    for entry in catalog.values():
        assert entry.module and entry.event_id >= 0


@BOUNDED
@given(st.binary(max_size=3000))
@example(b"\xef\xbb\xbf" + ",".join(COLUMNS).encode() + b'\r\n"unterminated')
@example(",".join(COLUMNS).encode("cp932") + "\r\nノード,エラー,1,停止\r\n".encode("cp932"))
def test_arbitrary_bytes_as_a_vendor_list_never_raise(raw: bytes) -> None:
    problems: list[Problem] = []
    text = decode_csv(raw, "list.csv", problems)
    parse_vendor_csv(text, "list.csv", problems)
    check_problems(problems)
