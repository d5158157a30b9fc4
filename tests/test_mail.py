"""The mail itself: every charset round-trips, legacy subjects, the HTML alternative,
routes, and (property-based) no event content can inject a header or break rendering."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.catalog import Catalog, CatalogEntry
from shared.config import CHARSETS, FilterConfig, MailConfig, Route
from shared.event import Event, new_event
from shared.filter import decide
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
