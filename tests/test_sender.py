"""A sender per relay and a display name: the From header and the envelope follow the relay
that carries the mail, and nothing else in the mail changes."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from shared.catalog import load_catalog
from shared.config import FilterConfig, MailConfig, parse_config
from shared.errors import ConfigError
from shared.event import new_event
from shared.filter import decide
from tests.conftest import Certs, Process
from tests.pipeline import SMTP_PASSWORD, publish_events, start_worker, write_config
from tests.smtpserver import SmtpServer
from worker.mime import from_header
from worker.render import Renderer


def rendered(**mail: object) -> tuple[Renderer, bytes]:
    config = MailConfig(sender="cluster@example.com", to=("ops@example.com",), **mail)  # type: ignore[arg-type]  # test-only keyword pass-through
    renderer = Renderer(config)
    event = new_event(
        module="node", event_id=1, cluster="c", node="n1", source="t", params={"server": "db1"}
    )
    mail = renderer.render(event, decide(event, load_catalog([]), FilterConfig()))
    return renderer, mail.data


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.parametrize(
    ("name", "charset", "expected"),
    [
        ("", "utf-8", "cluster@example.com"),
        ("Cluster alerts", "utf-8", '"Cluster alerts" <cluster@example.com>'),
        ('Ops "night" \\ shift', "utf-8", '"Ops \\"night\\" \\\\ shift" <cluster@example.com>'),
        (
            "Line\r\nBcc: x@evil.example",
            "utf-8",
            '"Line Bcc: x@evil.example" <cluster@example.com>',
        ),
    ],
)
def test_from_header_quotes_or_encodes_the_display_name(
    name: str, charset: str, expected: str
) -> None:
    assert from_header("cluster@example.com", name, charset) == expected


def test_a_japanese_display_name_decodes_back_in_the_mail() -> None:
    _, data = rendered(from_name="クラスタ監視", charset="iso-2022-jp")
    assert data.startswith(b"From: =?iso-2022-jp?B?")
    sender = parsed(data)["From"]
    assert sender.addresses[0].display_name == "クラスタ監視"
    assert sender.addresses[0].addr_spec == "cluster@example.com"


def test_a_relay_sender_changes_only_the_from_header_and_the_envelope() -> None:
    config = MailConfig(sender="cluster@example.com", to=("ops@example.com",), from_name="HA")
    event = new_event(module="node", event_id=1, cluster="c", node="n1", source="t")
    mail = Renderer(config).render(event, decide(event, load_catalog([]), FilterConfig()))
    moved = mail.with_sender("approved@relay.example")
    assert moved.sender == "approved@relay.example"
    assert moved.data.split(b"\r\n", 1)[0] == b'From: "HA" <approved@relay.example>'
    assert moved.data.split(b"\r\n", 1)[1] == mail.data.split(b"\r\n", 1)[1]
    assert parsed(moved.data)["Message-ID"] == parsed(mail.data)["Message-ID"]
    assert mail.with_sender(mail.sender) is mail


def test_sender_helo_and_from_name_are_validated() -> None:
    good = parse_config(
        {
            "mail": {"to": ["o@example.com"], "from_name": "Cluster"},
            "smtp": [{"host": "a", "from": "approved@a.example", "helo": "node1.example.com"}],
        },
        sections=("mail", "smtp"),
    )
    assert good.mail.from_name == "Cluster"
    assert (good.smtp[0].sender, good.smtp[0].helo) == ("approved@a.example", "node1.example.com")
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "mail": {"to": ["o@example.com"], "from_name": "two\nlines"},
                "smtp": [{"host": "a", "from": "Not An Address", "helo": "bad host!"}],
            },
            sections=("mail", "smtp"),
        )
    problems = sorted(str(p) for p in caught.value.problems)
    assert problems == [
        "mail.from_name: must be one line of at most 200 characters",
        "smtp[0].from: not a plain e-mail address: 'Not An Address'",
        "smtp[0].helo: not a host name: 'bad host!'",
    ]


@pytest.mark.integration
def test_each_relay_gets_mail_from_its_own_approved_sender(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    first = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    second = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    first.handler.approved_senders = {"alerts@one.example"}
    second.handler.approved_senders = {"alerts@two.example"}
    config = write_config(tmp_path, vhost, [first, second], certs)
    text = config.read_text()
    # Each [[smtp]] table gets its provider's sender; the first also its EHLO name.
    text = text.replace(
        f"port = {first.port}\n",
        f'port = {first.port}\nfrom = "alerts@one.example"\nhelo = "node1.example.com"\n',
    ).replace(f"port = {second.port}\n", f'port = {second.port}\nfrom = "alerts@two.example"\n')
    text = text.replace(
        'to = ["ops@example.com"', 'from_name = "HA cluster"\nto = ["ops@example.com"', 1
    )
    config.write_text(text)
    start_worker(processes, config)
    [one] = publish_events(vhost, 1)
    assert first.wait_for(lambda received: len(received) == 1, 30)
    first.go_down()  # failover: the next mail goes to the other provider's relay
    [two] = publish_events(vhost, 1)
    assert second.wait_for(lambda received: len(received) == 1, 60)
    [via_first], [via_second] = first.received, second.received
    assert (via_first.event_id, via_second.event_id) == (one, two)
    assert via_first.mail_from == "alerts@one.example" and via_first.helo == "node1.example.com"
    assert via_second.mail_from == "alerts@two.example"
    assert str(via_first.parsed()["From"]) == "HA cluster <alerts@one.example>"
    assert str(via_second.parsed()["From"]) == "HA cluster <alerts@two.example>"
    # The Message-ID's domain stays [mail] from's, whatever relay carried it.
    assert str(via_second.parsed()["Message-ID"]) == f"<{two}@example.com>"
