"""The sender against real TLS SMTP servers (aiosmtpd + trustme): mail goes out only over
verified TLS unless plaintext was chosen, and refusals are counted."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from shared.config import MailConfig, SmtpRelay
from shared.errors import DeliveryError, PermanentError, TlsRefusedError, TransientError
from shared.event import new_event
from shared.filter import Decision
from shared.secret import Secret
from tests.conftest import Certs, free_port
from tests.smtpserver import SmtpServer, secret_forms
from worker.classify import combine_attempts
from worker.metrics import Metrics
from worker.render import Mail, Renderer
from worker.send import Sender, Sent

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., SmtpServer]


def make_mail(to: tuple[str, ...] = ("ops@example.com",)) -> Mail:
    event = new_event(
        module="rm", event_id=9, cluster="c", node="n", source="t", level="error", text="boom"
    )
    config = MailConfig(sender="cluster@example.com", to=to)
    return Renderer(config).render(event, Decision(True, "error", None, None, "test"))


def relay(server: SmtpServer | None, certs: Certs, **overrides: object) -> SmtpRelay:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": server.port if server else free_port(),
        "security": "starttls",
        "ca_file": certs.ca_file,
        "timeout": 5.0,
    }
    fields.update(overrides)
    return SmtpRelay(**fields)  # type: ignore[arg-type]


def sent_with(
    *relays: SmtpRelay,
    mail: Mail | None = None,
    retry_budget: float = 0.5,
    max_attempts: int = 2,
) -> tuple[Metrics, Sent | BaseException]:
    """Send one mail through a fresh sender; returns its metrics and what the sender
    returned (the relay and any deferred recipients), or the exception."""
    metrics = Metrics([r.label for r in relays])
    sender = Sender(relays, metrics, retry_budget=retry_budget, max_attempts=max_attempts)

    async def go() -> Sent | BaseException:
        try:
            return await sender.send(mail or make_mail())
        except Exception as exc:
            return exc
        finally:
            await sender.close()

    return metrics, asyncio.run(go())


def send_with(
    *relays: SmtpRelay,
    mail: Mail | None = None,
    retry_budget: float = 0.5,
    max_attempts: int = 2,
) -> tuple[Metrics, str | BaseException]:
    """Like :func:`sent_with`, with the relay's label for a mail that went out."""
    metrics, result = sent_with(
        *relays, mail=mail, retry_budget=retry_budget, max_attempts=max_attempts
    )
    return metrics, result.relay if isinstance(result, Sent) else result


def send(*relays: SmtpRelay, mail: Mail | None = None) -> tuple[Metrics, str | BaseException]:
    return send_with(*relays, mail=mail)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, name
    return sample


def test_starttls_with_auth_delivers(
    smtp_server: ServerFactory, certs: Certs, tmp_path: Path
) -> None:
    server = smtp_server("starttls", credentials=("alert", "pw-123"))
    config = relay(server, certs, username="alert", password=Secret("pw-123"))
    mail = make_mail()
    metrics, result = send(config, mail=mail)
    assert result == config.label
    [received] = server.received
    assert received.tls and received.auth_login == "alert"
    # The relay would take AUTH in the clear; the client upgraded first.
    assert b"STARTTLS" in server.cleartext.upper()
    for form in secret_forms("alert", "pw-123"):
        assert form not in server.cleartext
    assert received.rcpt_tos == ["ops@example.com"]
    assert received.parsed()["Message-ID"] == f"<{mail.event_id}@example.com>"
    assert value(metrics, "clusteralert_mails_sent_total", relay=config.label) == 1


def test_smtps_delivers(smtp_server: ServerFactory, certs: Certs) -> None:
    server = smtp_server("smtps")
    config = relay(server, certs, security="smtps")
    metrics, result = send(config)
    assert result == config.label
    assert [r.tls for r in server.received] == [True]


def test_connections_are_reused_across_mails(smtp_server: ServerFactory, certs: Certs) -> None:

    server = smtp_server("starttls")
    config = relay(server, certs, max_connections=2)
    sender = Sender([config], Metrics([config.label]))

    async def go() -> None:
        await asyncio.gather(*(sender.send(make_mail()) for _ in range(20)))
        await sender.close()

    asyncio.run(go())
    assert len(server.received) == 20
    assert server.handler.connections <= 2


def test_no_starttls_offered_means_no_mail(smtp_server: ServerFactory, certs: Certs) -> None:
    # The server speaks plain SMTP and would accept the mail without TLS.
    server = smtp_server("starttls", context=None)
    metrics, result = send(relay(server, certs))
    assert isinstance(result, TlsRefusedError)
    assert result.cause == "not_offered"
    assert server.received == []
    assert value(metrics, "clusteralert_tls_refused_total", cause="not_offered") == 1
    assert value(metrics, "clusteralert_mails_failed_total", reason="tls_refused") == 1


def test_stripped_starttls_never_sends_the_password_in_the_clear(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    # STARTTLS stripped from the EHLO reply (as a man in the middle does), while the relay
    # offers AUTH and would check the password and take the mail in plaintext.
    server = smtp_server("starttls", context=None, credentials=("alert", "pw-123"))
    config = relay(server, certs, username="alert", password=Secret("pw-123"))
    metrics, result = send(config)
    assert b"EHLO" in server.cleartext.upper()  # the recorder saw the conversation
    for form in secret_forms("alert", "pw-123"):
        assert form not in server.cleartext, form
    assert isinstance(result, TlsRefusedError) and result.cause == "not_offered"
    assert server.received == []


def test_starttls_offered_then_refused_means_no_mail(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls")
    server.reject_starttls = True
    metrics, result = send(relay(server, certs))
    assert isinstance(result, TlsRefusedError) and result.cause == "rejected"
    assert "454" in str(result)
    assert server.received == []
    assert value(metrics, "clusteralert_tls_refused_total", cause="rejected") == 1


def test_tls_contexts_verify_and_require_tls_1_2() -> None:
    from shared.tls import client_context

    context = client_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def old_tls_context(certs: Certs) -> ssl.SSLContext:
    """A server that offers only TLS 1.0 and 1.1. OpenSSL 3 refuses those below security
    level 0, so the level is lowered on purpose: the server must really offer them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certs.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with warnings.catch_warnings():  # the versions are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def weak_platform_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``ssl.create_default_context`` behave as on platforms whose default still
    allows TLS 1.0 (Python before 3.10, some distributions' OpenSSL settings): the floor
    must be ours, not an accident of the machine the tests run on."""
    original = ssl.create_default_context

    def weak(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = original(*args, **kwargs)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    monkeypatch.setattr(ssl, "create_default_context", weak)


@pytest.mark.parametrize("platform", ["as_installed", "weak_default"])
@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_a_relay_offering_only_tls_1_1_gets_no_mail(
    mode: str,
    platform: str,
    smtp_server: ServerFactory,
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = smtp_server(mode, context=old_tls_context(certs), credentials=("alert", "pw-123"))
    if platform == "weak_default":
        weak_platform_default(monkeypatch)
    config = relay(server, certs, security=mode, username="alert", password=Secret("pw-123"))
    metrics, result = send(config)
    # No handshake, so no mail and no password. This relay drops the connection during
    # the handshake rather than sending an alert: after STARTTLS that is a TLS refusal;
    # with SMTPS it looks like any reset while connecting, so it stays transient.
    assert isinstance(result, DeliveryError), result
    if mode == "starttls":
        assert isinstance(result, TlsRefusedError) and result.cause == "handshake", result
        assert value(metrics, "clusteralert_tls_refused_total", cause="handshake") == 1
    assert server.received == []
    for form in secret_forms("alert", "pw-123"):
        assert form not in server.cleartext


def test_the_old_tls_server_is_real(smtp_server: ServerFactory, certs: Certs) -> None:
    """The control for the test above: a client that allows TLS 1.1 does get through, so
    the refusal there is our floor and not a broken server."""
    server = smtp_server("smtps", context=old_tls_context(certs))
    client = ssl.create_default_context(cafile=str(certs.ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.1"
        assert tls.recv(100).startswith(b"220 ")


def test_untrusted_certificate_means_no_mail(smtp_server: ServerFactory, certs: Certs) -> None:
    stranger = trustme.CA()
    server = smtp_server("starttls", context=certs.server_context(ca=stranger))
    metrics, result = send(relay(server, certs))
    assert isinstance(result, TlsRefusedError) and result.cause == "verify"
    assert server.received == []
    assert value(metrics, "clusteralert_tls_refused_total", cause="verify") == 1


def test_certificate_for_another_host_means_no_mail(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    for mode in ("starttls", "smtps"):
        server = smtp_server(mode, context=certs.server_context("other.example"))
        metrics, result = send(relay(server, certs, security=mode))
        assert isinstance(result, TlsRefusedError) and result.cause == "verify", mode
        assert server.received == []


def test_system_trust_store_does_not_trust_a_private_ca(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("smtps")
    _, result = send(relay(server, certs, security="smtps", ca_file=None))
    assert isinstance(result, TlsRefusedError) and result.cause == "verify"


def test_plaintext_only_when_chosen(smtp_server: ServerFactory, certs: Certs) -> None:
    server = smtp_server("plain", context=None)
    _, result = send(relay(server, certs, security="none"))
    assert result == f"127.0.0.1:{server.port}"
    assert [r.tls for r in server.received] == [False]


def test_wrong_password_is_permanent_and_never_shown(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls", credentials=("alert", "right"))
    metrics, result = send(relay(server, certs, username="alert", password=Secret("wrong-pw")))
    assert isinstance(result, PermanentError) and result.reason == "auth"
    assert "wrong-pw" not in str(result)
    assert server.received == []


def test_failover_to_the_second_relay(smtp_server: ServerFactory, certs: Certs) -> None:
    server = smtp_server("starttls")
    down = relay(None, certs)
    up = relay(server, certs)
    metrics, result = send(down, up)
    assert result == up.label
    assert len(server.received) == 1
    assert value(metrics, "clusteralert_mails_sent_total", relay=up.label) == 1


def test_all_relays_down_is_transient(certs: Certs) -> None:
    metrics, result = send(relay(None, certs))
    assert isinstance(result, TransientError) and result.reason == "connect"
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") >= 1


def test_attempt_classification_after_all_relays() -> None:
    tls = TlsRefusedError("not_offered", "x")
    transient = TransientError("timeout", "x")
    permanent = PermanentError("rejected_5xx", "x")
    assert combine_attempts([tls, transient, permanent]) is transient
    assert combine_attempts([tls, TlsRefusedError("verify", "y")]) is tls
    assert combine_attempts([tls, permanent]) is permanent


def test_451_twice_then_accepted_is_delivered_with_retries_counted(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls")
    server.handler.data_replies = ["451 4.3.0 try later", "451 4.3.0 try later"]
    config = relay(server, certs)
    metrics, result = send_with(config, retry_budget=10, max_attempts=4)
    assert result == config.label
    assert len(server.received) == 1
    assert server.handler.data_commands == 3
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 2
    assert value(metrics, "clusteralert_mails_failed_total", reason="rejected_4xx") == 2
    assert value(metrics, "clusteralert_mails_sent_total", relay=config.label) == 1


def test_550_is_permanent_and_not_retried(smtp_server: ServerFactory, certs: Certs) -> None:
    server = smtp_server("starttls")
    server.handler.data_replies = ["550 5.7.1 rejected by policy"]
    metrics, result = send_with(relay(server, certs), retry_budget=10, max_attempts=4)
    assert isinstance(result, PermanentError) and result.reason == "rejected_5xx"
    assert server.handler.data_commands == 1
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 0


def test_some_recipients_refused_still_counts_as_sent(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls")
    server.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 no such user"}
    mail = make_mail(to=("ops@example.com", "gone@example.com"))
    metrics, result = send_with(relay(server, certs), mail=mail)
    assert result == f"127.0.0.1:{server.port}"
    [received] = server.received
    assert received.rcpt_tos == ["ops@example.com"]
    assert value(metrics, "clusteralert_recipients_refused_total") == 1
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 0


def test_recipients_refused_for_now_are_handed_back_as_deferred(
    smtp_server: ServerFactory, certs: Certs
) -> None:

    server = smtp_server("starttls")
    server.handler.rcpt_replies = {
        "gone@example.com": "550 5.1.1 no such user",
        "busy@example.com": "450 4.2.0 greylisted, try later",
    }
    config = relay(server, certs)
    mail = make_mail(to=("ops@example.com", "gone@example.com", "busy@example.com"))
    metrics, sent = sent_with(config, mail=mail)
    assert isinstance(sent, Sent), sent
    [received] = server.received
    assert received.rcpt_tos == ["ops@example.com"]
    # Only the 4xx is worth another try; the 5xx stays logged and counted.
    assert sent.relay == config.label
    assert list(sent.deferred) == ["busy@example.com"]
    assert sent.deferred["busy@example.com"].text == "450 4.2.0 greylisted, try later"
    assert value(metrics, "clusteralert_recipients_refused_total") == 2
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 0


def test_a_dropped_idle_connection_is_reopened_without_a_failure(
    smtp_server: ServerFactory, certs: Certs
) -> None:

    server = smtp_server("starttls")
    config = relay(server, certs, max_connections=1)
    metrics = Metrics([config.label])
    sender = Sender([config], metrics)

    async def go() -> None:
        await sender.send(make_mail())
        # The relay closes the idle connection (as relays do after a timeout), then
        # listens again before the next mail.
        server.go_down()
        server.come_back()
        await sender.send(make_mail())
        await sender.close()

    asyncio.run(go())
    assert len(server.received) == 2
    for reason in ("connect", "disconnected"):
        assert value(metrics, "clusteralert_mails_failed_total", reason=reason) == 0
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 0


def test_a_silently_dead_idle_connection_is_replaced_after_a_probe(
    smtp_server: ServerFactory, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import relay as relay_module

    monkeypatch.setattr(relay_module, "PROBE_AFTER", 0.0)
    monkeypatch.setattr(relay_module, "PROBE_TIMEOUT", 0.5)
    server = smtp_server("starttls")
    config = relay(server, certs, max_connections=1, timeout=30.0)
    metrics = Metrics([config.label])
    sender = Sender([config], metrics)

    async def go() -> float:
        await sender.send(make_mail())
        server.freeze_connections()
        started = time.monotonic()
        await sender.send(make_mail())
        await sender.close()
        return time.monotonic() - started

    elapsed = asyncio.run(go())
    assert len(server.received) == 2
    assert server.handler.connections == 2
    # The probe, not the 30 s relay timeout, found the dead connection.
    assert elapsed < 15
    assert value(metrics, "clusteralert_retries_total", stage="inprocess") == 0


def test_a_relay_that_hangs_up_after_n_mails_loses_nothing(
    smtp_server: ServerFactory, certs: Certs
) -> None:

    server = smtp_server("starttls")
    server.handler.max_per_connection = 3
    config = relay(server, certs, max_connections=2)
    metrics = Metrics([config.label])
    sender = Sender([config], metrics)

    async def go() -> None:
        for _ in range(4):
            await asyncio.gather(*(sender.send(make_mail()) for _ in range(5)))
        await sender.close()

    asyncio.run(go())
    assert len(server.received) == 20
    assert server.handler.connections >= 20 // 3
    for reason in ("connect", "disconnected", "timeout"):
        assert value(metrics, "clusteralert_mails_failed_total", reason=reason) == 0


def test_rate_limit_spaces_mails(smtp_server: ServerFactory, certs: Certs) -> None:

    server = smtp_server("starttls")
    config = relay(server, certs, max_connections=4, rate_limit=20.0)
    sender = Sender([config], Metrics([config.label]))

    async def go() -> float:
        started = time.monotonic()
        await asyncio.gather(*(sender.send(make_mail()) for _ in range(11)))
        elapsed = time.monotonic() - started
        await sender.close()
        return elapsed

    # 11 mails at 20/s: the last may start no earlier than 0.5 s after the first.
    assert asyncio.run(go()) >= 0.5
    assert len(server.received) == 11


def test_a_failing_relay_sits_out_its_cooldown(smtp_server: ServerFactory, certs: Certs) -> None:

    backup = smtp_server("starttls")
    # A relay that answers but refuses STARTTLS: every attempt is a connection it counts.
    failing = smtp_server("starttls")
    failing.reject_starttls = True
    dead = relay(failing, certs, cooldown=60.0)
    metrics = Metrics([dead.label])
    sender = Sender([dead, relay(backup, certs)], metrics)

    async def go() -> None:
        for _ in range(6):
            await sender.send(make_mail())
        await sender.close()

    asyncio.run(go())
    assert len(backup.received) == 6
    # Three failures start the cool-down; the next three mails skip the failing relay.
    assert failing.handler.connections == 3
    assert sender.relays[0].cooling_down(time.monotonic())


@pytest.mark.parametrize(
    ("recipient_reply", "data_reply"),
    [("550 5.1.1 no such user", None), (None, "554 5.7.1 rejected as spam")],
    ids=["recipient-refused", "content-refused"],
)
def test_a_relay_refusing_only_the_mail_never_cools_down(
    recipient_reply: str | None,
    data_reply: str | None,
    smtp_server: ServerFactory,
    certs: Certs,
) -> None:
    """A relay that answers and refuses a mail's recipients or content is up: mails
    after it must still go to it first, however many it refused."""
    picky = smtp_server("starttls")
    if recipient_reply:
        picky.handler.rcpt_replies = {"gone@example.com": recipient_reply}
    if data_reply:
        picky.handler.data_replies = [data_reply] * 5
    backup = smtp_server("starttls")
    config = relay(picky, certs, cooldown=60.0)
    sender = Sender(
        [config, relay(backup, certs)], Metrics([config.label]), retry_budget=0, max_attempts=1
    )

    async def go() -> None:
        for _ in range(5):
            await sender.send(make_mail(to=("gone@example.com",)))
        await sender.send(make_mail())  # taken by the first relay
        await sender.close()

    asyncio.run(go())
    assert not sender.relays[0].cooling_down(time.monotonic())
    assert len(picky.handler.rcpt_commands) == 6  # every mail went to it first
    assert [r.rcpt_tos for r in picky.received] == [["ops@example.com"]]
    assert len(backup.received) == 5  # the refused ones, from the second relay


def test_only_failures_of_the_relay_itself_count_towards_its_cool_down() -> None:
    from aiosmtplib import (
        SMTPDataError,
        SMTPRecipientRefused,
        SMTPRecipientsRefused,
        SMTPSenderRefused,
        SMTPServerDisconnected,
    )

    from worker.classify import classify_transaction

    refused = SMTPRecipientsRefused([SMTPRecipientRefused(450, "greylisted", "a@b.example")])
    assert not classify_transaction(refused).about_relay
    assert not classify_transaction(SMTPDataError(554, "spam")).about_relay
    assert classify_transaction(SMTPDataError(452, "queue full")).about_relay
    assert classify_transaction(SMTPSenderRefused(550, "not yours", "x@y.example")).about_relay
    assert classify_transaction(SMTPServerDisconnected("gone")).about_relay


def test_when_every_relay_cools_down_all_are_tried(
    smtp_server: ServerFactory, certs: Certs
) -> None:

    failing = smtp_server("starttls")
    failing.reject_starttls = True
    config = relay(failing, certs, cooldown=60.0)
    sender = Sender([config], Metrics([config.label]), retry_budget=0, max_attempts=1)

    async def go() -> list[BaseException]:
        errors = []
        for _ in range(5):
            try:
                await sender.send(make_mail())
            except Exception as exc:
                errors.append(exc)
        await sender.close()
        return errors

    errors = asyncio.run(go())
    assert [type(e) for e in errors] == [TlsRefusedError] * 5
    # Skipping the only relay would only delay the alert: it is tried every time.
    assert failing.handler.connections == 5


def test_a_relay_step_slower_than_the_timeout_is_a_transient_timeout(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls")
    server.handler.data_delay = 5.0  # the reply to DATA never comes within the timeout
    config = relay(server, certs, timeout=0.5)
    started = time.monotonic()
    metrics, result = send_with(config, retry_budget=0, max_attempts=1)
    elapsed = time.monotonic() - started
    assert isinstance(result, TransientError) and result.reason == "timeout", result
    # Bounded by the step timeout, not by the relay's 5 s.
    assert elapsed < 3, elapsed
    assert value(metrics, "clusteralert_mails_failed_total", reason="timeout") == 1


def test_a_connection_idle_past_the_limit_is_closed_not_reused(
    smtp_server: ServerFactory, certs: Certs
) -> None:
    from worker import relay as relay_module

    # Relays drop idle sessions after a few minutes. Rather than wait that long, the
    # pooled connection is made to look idle past the real limit.
    server = smtp_server("starttls")
    config = relay(server, certs, max_connections=1)
    sender = Sender([config], Metrics([config.label]))
    [pool] = sender.relays

    async def go() -> None:
        await sender.send(make_mail())
        await sender.send(make_mail())  # at once: the pooled connection is reused
        assert server.handler.connections == 1
        pool._idle = [(c, used - relay_module.MAX_IDLE - 1) for c, used in pool._idle]
        await sender.send(make_mail())
        await sender.close()

    asyncio.run(go())
    assert len(server.received) == 3
    assert server.handler.connections == 2


@pytest.mark.parametrize(
    ("reply", "kind", "reason"),
    [
        ("400 4.0.0 try later", TransientError, "rejected_4xx"),
        ("454 4.7.0 Temporary authentication failure", TransientError, "rejected_4xx"),
        ("499 4.0.0 odd but temporary", TransientError, "rejected_4xx"),
        ("500 5.5.2 Syntax error", PermanentError, "auth"),
        ("535 5.7.8 Authentication credentials invalid", PermanentError, "auth"),
    ],
)
def test_an_auth_reply_is_classified_by_its_code(
    reply: str, kind: type, reason: str, smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls", credentials=("alert", "pw-123"))
    server.auth_reply = reply
    config = relay(server, certs, username="alert", password=Secret("pw-123"))
    metrics, result = send_with(config, retry_budget=0, max_attempts=1)
    assert isinstance(result, kind) and result.reason == reason, result
    assert str(result).count("AUTH " + reply[:3]) == 1, str(result)
    assert reply[4:] in str(result)
    assert "pw-123" not in str(result)
    assert server.received == []


@pytest.mark.parametrize(
    ("replies", "kind", "reason"),
    [
        (
            {"a@example.com": "450 4.2.1 busy", "b@example.com": "451 4.3.0 later"},
            TransientError,
            "rejected_4xx",
        ),
        (
            {"a@example.com": "400 4.0.0 hm", "b@example.com": "550 5.1.1 gone"},
            TransientError,
            "rejected_4xx",
        ),
        (
            {"a@example.com": "499 4.0.0 hm", "b@example.com": "550 5.1.1 gone"},
            TransientError,
            "rejected_4xx",
        ),
        (
            {"a@example.com": "500 5.0.0 no", "b@example.com": "550 5.1.1 gone"},
            PermanentError,
            "rejected_5xx",
        ),
    ],
)
def test_every_recipient_refused_is_classified_by_the_codes(
    replies: dict[str, str], kind: type, reason: str, smtp_server: ServerFactory, certs: Certs
) -> None:
    server = smtp_server("starttls")
    server.handler.rcpt_replies = replies
    mail = make_mail(to=tuple(replies))
    _, result = send_with(relay(server, certs), mail=mail, retry_budget=0, max_attempts=1)
    assert isinstance(result, kind) and result.reason == reason, result
    assert str(result).count("all recipients refused: ") == 1
    for address, reply in replies.items():
        assert f"{address}: {reply}" in str(result)
    assert server.received == []


@pytest.mark.parametrize("security", ["starttls", "smtps"])
def test_the_relay_certificates_expiry_is_exported_at_the_handshake(
    smtp_server: ServerFactory, certs: Certs, security: str
) -> None:
    """The gauge holds the notAfter of the certificate the relay really showed."""
    not_after = datetime(2031, 3, 14, 15, 9, 26, tzinfo=UTC)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certs.ca.issue_cert("127.0.0.1", not_after=not_after).configure_cert(context)
    server = smtp_server(security, context=context)
    config = relay(server, certs, security=security)
    expiry = "clusteralert_relay_cert_expiry_timestamp_seconds"
    assert Metrics([config.label]).registry.get_sample_value(expiry, {"relay": config.label}) == 0
    metrics, result = send(config)
    assert result == config.label
    assert value(metrics, expiry, relay=config.label) == not_after.timestamp()
