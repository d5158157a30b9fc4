"""Rendering: headers never carry raw event content, charsets are the configured ones."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from shared.catalog import Catalog, CatalogEntry
from shared.config import FilterConfig, MailConfig
from shared.event import Event, new_event
from shared.filter import decide
from worker.render import Mail, Renderer

CATALOG = Catalog(
    [
        CatalogEntry(
            "rm",
            9,
            "error",
            True,
            "Monitor {monitor} detected an error: {detail}",
            action="Check the monitored service on {node}.",
        ),
    ]
)


def render(event: Event, charset: str = "utf-8", **mail: object) -> tuple[Mail, EmailMessage]:
    config = MailConfig(
        sender="cluster@example.com",
        to=("ops@example.com", "b@example.com"),
        charset=charset,
        **mail,
    )  # type: ignore[arg-type]
    result = Renderer(config).render(event, decide(event, CATALOG, FilterConfig()))
    parsed = message_from_bytes(result.data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return result, parsed


def rm9(**params: str) -> Event:
    return new_event(module="rm", event_id=9, cluster="c1", node="node1", source="t", params=params)


def test_headers_and_body() -> None:
    event = rm9(monitor="httpw", detail="timeout")
    mail, msg = render(event)
    assert msg["Subject"] == "[error] c1 node1: Monitor httpw detected an error: timeout"
    assert msg["Message-ID"] == f"<{event.id}@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert (msg["X-Clusteralert-Module"], msg["X-Clusteralert-Event"]) == ("rm", "9")
    assert (msg["X-Clusteralert-Level"], msg["X-Clusteralert-Node"]) == ("error", "node1")
    assert msg["X-Clusteralert-Cluster"] == "c1"
    assert msg["Date"] is not None
    body = msg.get_content().replace("\r\n", "\n")
    assert body.startswith("Monitor httpw detected an error: timeout\n")
    assert "Check the monitored service on node1." in body
    assert "  monitor: httpw" in body
    assert f"Event: {event.id}" in body
    assert mail.recipients == ("ops@example.com", "b@example.com")
    assert msg["Content-Transfer-Encoding"] == "7bit"


def test_missing_placeholder_renders_visibly() -> None:
    _, msg = render(rm9(monitor="m"))
    assert msg["Subject"].endswith("detected an error: {detail?}")


def test_hostile_params_never_reach_a_header() -> None:
    event = rm9(monitor="x\r\nBcc: victim@example.com\r\n\r\nbody", detail="\x00" * 10)
    mail, msg = render(event)
    assert msg["Bcc"] is None
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc" not in head
    for line in head.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
    assert "x\\r\\nBcc: victim@example.com" in msg["Subject"]


def test_huge_params_still_give_a_bounded_subject() -> None:
    event = new_event(
        module="rm",
        event_id=9,
        cluster="c",
        node="n",
        source="t",
        params={"monitor": "m" * 1_000_000, "detail": "d"},
    )
    mail, msg = render(event)
    assert len(msg["Subject"]) <= 200
    assert event.id in msg.get_content()


@pytest.mark.parametrize("charset", ["utf-8", "iso-2022-jp", "shift_jis", "euc-jp"])
def test_japanese_text_round_trips_in_the_configured_charset(charset: str) -> None:
    event = rm9(monitor="監視リソース", detail="タイムアウト (応答なし)")
    mail, msg = render(event, charset)
    assert mail.charset == charset
    assert msg.get_content_charset() == charset
    assert (
        msg["Subject"] == "[error] c1 node1: Monitor 監視リソース detected an error: "
        "タイムアウト (応答なし)"
    )
    assert "Monitor 監視リソース detected an error: タイムアウト (応答なし)" in msg.get_content()
    raw_subject = next(line for line in mail.data.split(b"\r\n") if line.startswith(b"Subject:"))
    assert f"=?{charset}?B?".encode() in raw_subject
    # Every physical line stays short and 7-bit: any relay can carry it.
    assert mail.data.isascii()
    assert max(len(line) for line in mail.data.split(b"\r\n")) <= 998


def test_iso_2022_jp_body_is_7bit() -> None:
    mail, msg = render(rm9(monitor="監視", detail="エラー"), "iso-2022-jp")
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert b"\x1b$B" in mail.data  # the JIS escape sequence, unencoded


def test_unencodable_text_falls_back_to_utf8() -> None:
    mail, msg = render(rm9(monitor="Ωμέγα", detail="😀"), "iso-2022-jp")
    assert mail.charset == "utf-8"
    assert msg.get_content_charset() == "utf-8"
    assert "Ωμέγα" in msg["Subject"]
    assert "😀" in msg.get_content()


def test_unknown_event_uses_its_own_text() -> None:
    event = new_event(
        module="zz",
        event_id=3,
        cluster="c",
        node="n",
        source="t",
        level="error",
        text="disk on fire",
    )
    _, msg = render(event)
    assert msg["Subject"] == "[error] c n: disk on fire"
