"""The mail itself: every charset round-trips, legacy subjects, the HTML alternative,
routes, and (property-based) no event content or mail setting can inject a header, lose the
event id, misroute or break rendering."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.header import decode_header
from email.message import EmailMessage
from fnmatch import fnmatchcase

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.catalog import Catalog, CatalogEntry
from shared.config import CHARSETS, FilterConfig, MailConfig, Route
from shared.event import Event, new_event
from shared.filter import decide
from shared.levels import LEVELS, Level
from worker.render import Mail, Renderer

CATALOG = Catalog(
    [
        CatalogEntry(
            "rm", 9, "error", True, "{monitor}: {detail}", action="Check {monitor} on {node}."
        )
    ]
)
TEXTS = {
    "japanese": ("監視リソース", "応答がありません"),
    "accented": ("Müller-Überwachung", "délai dépassé"),
    "ascii": ("httpw", "timeout"),
}


def mail_for(event: Event, **config: object) -> tuple[Mail, EmailMessage]:
    routes = config.pop("routes", ())
    mail_config = MailConfig(sender="cluster@example.com", to=("ops@example.com",), **config)  # type: ignore[arg-type]
    result = Renderer(mail_config, routes=routes).render(  # type: ignore[arg-type]
        event, decide(event, CATALOG, FilterConfig())
    )
    parsed = message_from_bytes(result.data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return result, parsed


def rm9(monitor: str, detail: str) -> Event:
    return new_event(
        module="rm",
        event_id=9,
        cluster="c",
        node="n1",
        source="t",
        params={"monitor": monitor, "detail": detail},
    )


@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("text", list(TEXTS))
def test_every_charset_round_trips_or_falls_back_to_utf8(charset: str, text: str) -> None:
    monitor, detail = TEXTS[text]
    mail, msg = mail_for(rm9(monitor, detail), charset=charset)
    try:
        f"{monitor}{detail}".encode(charset)
        expected = charset
    except UnicodeEncodeError:
        expected = "utf-8"  # the documented fallback, per mail
    assert mail.charset == expected
    assert msg.get_content_charset() == expected
    assert msg["Subject"] == f"[error] c n1: {monitor}: {detail}"
    body = msg.get_content().replace("\r\n", "\n")
    assert body.startswith(f"{monitor}: {detail}\n")
    assert f"Check {monitor} on n1." in body
    if text != "ascii":
        raw_subject = mail.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
        assert raw_subject.startswith(f"=?{expected}?B?".encode())
    assert mail.data.isascii()


def test_legacy_raw_subject_when_encoding_is_off() -> None:
    mail, _ = mail_for(rm9("監視", "異常"), charset="iso-2022-jp", subject_encode=False)
    subject = "[error] c n1: 監視: 異常"
    assert b"\r\nSubject: " + subject.encode("iso-2022-jp") + b"\r\n" in mail.data


def test_html_alternative_escapes_every_field() -> None:
    event = rm9('<script>alert("x")</script>', "a & b")
    mail, msg = mail_for(event, html=True)
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = (part.get_content() for part in msg.iter_parts())
    assert '<script>alert("x")</script>' in plain
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "a &amp; b" in html and event.id in html


def test_routes_choose_recipients_by_key_and_level() -> None:
    routes = (
        Route(to=("dba@example.com",), match=("db:*",)),
        Route(to=("oncall@example.com",), min_level="error"),
    )
    db = new_event(module="db", event_id=1, cluster="c", node="n", source="t", level="info")
    info = new_event(module="zz", event_id=1, cluster="c", node="n", source="t", level="info")
    assert mail_for(db, routes=routes)[0].recipients == ("dba@example.com",)
    assert mail_for(rm9("m", "d"), routes=routes)[0].recipients == ("oncall@example.com",)
    assert mail_for(info, routes=routes)[0].recipients == ("ops@example.com",)


HEADERS = {
    "From",
    "To",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Auto-Submitted",
    "Subject",
    "X-Clusteralert-Module",
    "X-Clusteralert-Event",
    "X-Clusteralert-Level",
    "X-Clusteralert-Node",
    "X-Clusteralert-Cluster",
    "Content-Type",
    "Content-Transfer-Encoding",
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.dictionaries(
        st.sampled_from(["monitor", "detail", "1", "x"]),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
        | st.sampled_from(
            ["\r\nBcc: evil@example.com", "\n\nbody", "=?utf-8?B?QmNjOiB4?=", "\x00\x1b[2J"]
        ),
        max_size=4,
    ),
    node=st.text(max_size=80),
    charset=st.sampled_from(CHARSETS),
    html=st.booleans(),
)
def test_arbitrary_params_never_inject_or_crash(
    params: dict[str, str], node: str, charset: str, html: bool
) -> None:
    event = new_event(module="rm", event_id=9, cluster="c", node=node, source="t", params=params)
    mail, msg = mail_for(event, charset=charset, html=html)
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    names = [
        line.split(b":", 1)[0].decode()
        for line in head.split(b"\r\n")
        if line and not line.startswith(b" ")
    ]
    assert set(names) <= HEADERS and len(names) == len(set(names))
    assert msg["Bcc"] is None
    assert event.id in msg["Message-ID"]
    assert event.id in mail.data.decode("ascii")
    assert all(len(line) <= 998 for line in mail.data.split(b"\r\n"))


ADDRESSES = ("ops@example.com", "dba@example.com", "oncall@example.com", "net@example.com")
PATTERNS = ("rm:*", "db:1", "*:9", "zz:*", "*", "db:?", "rm:1*")
HOSTILE = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    [
        "\r\nBcc: evil@example.com",
        "x\nSubject: forged",
        "\n\nbody",
        "=?utf-8?B?QmNjOiB4?=",
        "\x00\x1b[2J",
        "\u2028\u0085\x7f",
        "監視\r\nTo: evil@example.com",
    ]
)
PARAM_NAMES = st.sampled_from(["monitor", "detail", "1", "node"]) | st.from_regex(
    r"[A-Za-z0-9_]{1,12}", fullmatch=True
)
routes_strategy = st.lists(
    st.builds(
        Route,
        to=st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True).map(tuple),
        match=st.lists(st.sampled_from(PATTERNS), max_size=3).map(tuple),
        min_level=st.sampled_from(LEVELS),
    ),
    max_size=4,
)


def expected_recipients(routes: list[Route], key: str, level: Level) -> tuple[str, ...]:
    """The README's rule, written out again: the first route whose level and patterns
    match, else ``[mail] to``."""
    for route in routes:
        at_least = LEVELS.index(level) >= LEVELS.index(route.min_level)
        if at_least and (not route.match or any(fnmatchcase(key, p) for p in route.match)):
            return route.to
    return ("ops@example.com",)


def decoded(value: str) -> str:
    """An RFC 2047 header value as text. Not ``email.header.make_header``: it converts
    euc-jp to iso-2022-jp, which lacks some of euc-jp's characters."""
    return "".join(
        part.decode(charset or "ascii") if isinstance(part, bytes) else part
        for part, charset in decode_header(value)
    )


def raw_subject(mail: Mail) -> bytes:
    """The Subject header's value as sent, its folded lines joined."""
    head = mail.data.partition(b"\r\n\r\n")[0].replace(b"\r\n ", b" ")
    return head.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    module=st.sampled_from(["rm", "db", "zz"]),
    event_id=st.integers(0, 12),
    in_catalog=st.booleans(),
    template=HOSTILE | st.sampled_from(["{monitor}: {detail}", "{1} on {node} {missing}"]),
    catalog_level=st.sampled_from(LEVELS),
    event_level=st.none() | st.sampled_from(LEVELS),
    cluster=HOSTILE,
    text=st.none() | HOSTILE,
    params=st.dictionaries(PARAM_NAMES, HOSTILE, max_size=5),
    routes=routes_strategy,
    subject_encode=st.booleans(),
    charset=st.sampled_from(CHARSETS),
)
def test_any_event_and_mail_config_give_a_sound_mail(
    module: str,
    event_id: int,
    in_catalog: bool,
    template: str,
    catalog_level: Level,
    event_level: Level | None,
    cluster: str,
    text: str | None,
    params: dict[str, str],
    routes: list[Route],
    subject_encode: bool,
    charset: str,
) -> None:
    """Whatever the catalog entry, the event's fields, the routes and the subject setting:
    no header is added or forged, the event id is in the Message-ID and the body, the
    recipients are the routes' choice, the subject is encoded or raw as configured (the
    same text either way), and the mail parses in every charset."""
    entries = [CatalogEntry(module, event_id, catalog_level, True, template)] if in_catalog else []
    event = new_event(
        module=module,
        event_id=event_id,
        cluster=cluster,
        node="n1",
        source="t",
        level=event_level,
        params=params,
        text=text,
    )
    decision = decide(event, Catalog(entries), FilterConfig())
    mails = {}
    for encode in (subject_encode, not subject_encode):
        config = MailConfig(
            sender="cluster@example.com",
            to=("ops@example.com",),
            charset=charset,
            subject_encode=encode,
        )
        mails[encode] = Renderer(config, routes=routes).render(event, decision)
    mail = mails[subject_encode]
    head, _, _ = mail.data.partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert {n.decode("ascii") for n in names} <= HEADERS and len(names) == len(set(names))
    assert all(len(line) <= 998 for line in mail.data.split(b"\r\n"))

    msg = message_from_bytes(mail.data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Message-ID"] == f"<{event.id}@example.com>"
    part = msg.get_body(("plain",))
    assert part is not None and event.id in part.get_content()
    assert part.get_content_charset() == mail.charset

    recipients = expected_recipients(routes, event.key, decision.level)
    assert mail.recipients == recipients
    assert [a.addr_spec for a in msg["To"].addresses] == list(recipients)

    # Encoded: ASCII only (RFC 2047 words where needed). Raw: the charset's own bytes.
    # Either way the same one line of text.
    encoded, raw = raw_subject(mails[True]), raw_subject(mails[False])
    assert mails[True].data.isascii()
    shown = decoded(encoded.decode("ascii"))
    assert raw == shown.encode(mails[False].charset)
    assert not set(shown) & {"\r", "\n"} and len(shown) <= 200
