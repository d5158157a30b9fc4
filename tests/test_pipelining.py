"""SMTP PIPELINING (RFC 2920) against a real aiosmtpd relay: MAIL, every RCPT and DATA go
out in one write when the relay offers it, each reply is still classified as its own
step, and a relay that does not offer it gets one command per round trip."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.config import SmtpRelay
from shared.errors import PermanentError, TransientError
from shared.secret import Secret
from tests.conftest import Certs
from tests.smtpserver import SmtpServer
from tests.tcpproxy import TcpProxy
from tests.test_send_tls import make_mail, relay, send_with, sent_with, value
from tests.waiting import wait_until
from worker import pipelining
from worker.metrics import Metrics
from worker.render import Mail

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., SmtpServer]
BOTH = pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])


@pytest.fixture
def proxies() -> Iterator[Callable[[SmtpServer], TcpProxy]]:
    opened: list[TcpProxy] = []

    def open_(server: SmtpServer) -> TcpProxy:
        proxy = TcpProxy(("127.0.0.1", server.port))
        opened.append(proxy)
        return proxy

    yield open_
    for proxy in opened:
        proxy.close()


def send_two(config: SmtpRelay, mail: Mail) -> None:
    """Two mails over one connection: the second one's writes are the transaction's own
    (no greeting, STARTTLS or AUTH among them)."""
    from worker.send import Sender

    sender = Sender([config], Metrics([config.label]))

    async def go() -> None:
        try:
            await sender.send(mail)
            await sender.send(mail)
        finally:
            await sender.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("pipelining", "flights"),
    # Pipelined: MAIL + 3 RCPT + DATA, then the body. One by one: 5 commands, the body.
    [(True, 2), (False, 6)],
    ids=["pipelined", "one-by-one"],
)
def test_envelope_and_data_travel_in_one_write_over_starttls_and_auth(
    smtp_server: ServerFactory,
    certs: Certs,
    proxies: Callable[[SmtpServer], TcpProxy],
    pipelining: bool,
    flights: int,
) -> None:
    server = smtp_server("starttls", credentials=("alert", "pw-123"))
    server.handler.pipelining = pipelining
    proxy = proxies(server)
    config = relay(server, certs, port=proxy.port, username="alert", password=Secret("pw-123"))
    mail = make_mail(to=("a@example.com", "b@example.com", "c@example.com"))

    from worker.send import Sender

    sender = Sender([config], Metrics([config.label]))
    writes: list[int] = []

    async def go() -> None:
        try:
            await sender.send(mail)
            before = len(proxy.sent)
            await sender.send(mail)
            # Each client write over TLS is one record, read by the proxy in one recv.
            writes.append(len(proxy.sent) - before)
        finally:
            await sender.close()

    asyncio.run(go())
    assert writes == [flights]
    assert [r.rcpt_tos for r in server.received] == [list(mail.recipients)] * 2
    assert all(r.tls and r.auth_login == "alert" for r in server.received)


@BOTH
def test_what_goes_on_the_wire_in_plaintext(
    smtp_server: ServerFactory,
    certs: Certs,
    proxies: Callable[[SmtpServer], TcpProxy],
    pipelining: bool,
) -> None:
    server = smtp_server("plain", context=None)
    server.handler.pipelining = pipelining
    proxy = proxies(server)
    mail = make_mail(to=("a@example.com", "b@example.com"))
    send_two(relay(server, certs, port=proxy.port, security="none"), mail)
    envelope = [c for c in proxy.sent if c.startswith((b"MAIL", b"RCPT", b"DATA"))]
    # Pipelined: one write per mail. One by one: a write per command.
    assert len(envelope) == (2 if pipelining else 8)
    lines = b"".join(envelope).split(b"\r\n")
    assert lines[0].startswith(b"MAIL FROM:<cluster@example.com> size=")
    one = [lines[0], b"RCPT TO:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"]
    assert lines == [*one, *one, b""]
    assert len(server.received) == 2


@BOTH
@pytest.mark.parametrize(
    ("reply", "error", "reason"),
    [
        ("550 5.7.1 sender not allowed", PermanentError, "rejected_5xx"),
        ("451 4.3.0 try later", TransientError, "rejected_4xx"),
        ("421 4.3.2 closing", TransientError, "rejected_4xx"),
    ],
)
def test_a_refused_mail_from_is_its_own_step(
    smtp_server: ServerFactory,
    certs: Certs,
    pipelining: bool,
    reply: str,
    error: type[Exception],
    reason: str,
) -> None:
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.mail_replies = [reply]
    metrics, result = send_with(relay(server, certs), max_attempts=1)
    assert isinstance(result, error) and result.reason == reason  # type: ignore[attr-defined]
    assert reply in str(result)
    # The pipelined RCPT and DATA reached a relay with no sender: refused, not handled.
    assert server.handler.rcpt_commands == [] and server.handler.data_commands == 0
    assert server.received == []
    assert value(metrics, "clusteralert_mails_failed_total", reason=reason) == 1


@BOTH
def test_one_recipient_refused_for_now_among_accepted_ones_is_deferred(
    smtp_server: ServerFactory, certs: Certs, pipelining: bool
) -> None:
    from worker.send import Sent

    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.rcpt_replies = {"busy@example.com": "450 4.2.0 greylisted, try later"}
    config = relay(server, certs)
    mail = make_mail(to=("ops@example.com", "busy@example.com", "dev@example.com"))
    metrics, sent = sent_with(config, mail=mail)
    assert isinstance(sent, Sent), sent
    [received] = server.received
    assert received.rcpt_tos == ["ops@example.com", "dev@example.com"]
    assert sent.relay == config.label
    assert {k: v.text for k, v in sent.deferred.items()} == {
        "busy@example.com": "450 4.2.0 greylisted, try later"
    }
    assert value(metrics, "clusteralert_mails_sent_total", relay=config.label) == 1
    assert value(metrics, "clusteralert_recipients_refused_total") == 1


@BOTH
@pytest.mark.parametrize(
    ("second", "error", "reason"),
    [
        ("550 5.1.1 no such user", PermanentError, "rejected_5xx"),
        ("450 4.2.0 greylisted", TransientError, "rejected_4xx"),
    ],
)
def test_every_recipient_refused(
    smtp_server: ServerFactory,
    certs: Certs,
    pipelining: bool,
    second: str,
    error: type[Exception],
    reason: str,
) -> None:
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.rcpt_replies = {
        "gone@example.com": "550 5.1.1 no such user",
        "other@example.com": second,
    }
    mail = make_mail(to=("gone@example.com", "other@example.com"))
    metrics, result = send_with(relay(server, certs), mail=mail, max_attempts=1)
    assert isinstance(result, error) and result.reason == reason  # type: ignore[attr-defined]
    assert "all recipients refused" in str(result) and "gone@example.com" in str(result)
    assert server.handler.data_commands == 0 and server.received == []


@BOTH
@pytest.mark.parametrize(
    ("reply", "error", "reason"),
    [
        ("554 5.5.1 no valid recipients", PermanentError, "rejected_5xx"),
        ("451 4.3.0 DATA not now", TransientError, "rejected_4xx"),
    ],
)
def test_data_refused_instead_of_354(
    smtp_server: ServerFactory,
    certs: Certs,
    pipelining: bool,
    reply: str,
    error: type[Exception],
    reason: str,
) -> None:
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.data_command_replies = [reply]
    metrics, result = send_with(relay(server, certs), max_attempts=1)
    assert isinstance(result, error) and result.reason == reason  # type: ignore[attr-defined]
    assert reply in str(result)
    assert server.received == []


@BOTH
@pytest.mark.parametrize(
    ("reply", "error", "reason"),
    [
        ("550 5.7.1 rejected by policy", PermanentError, "rejected_5xx"),
        ("451 4.3.0 try later", TransientError, "rejected_4xx"),
    ],
)
def test_the_message_refused_after_its_body(
    smtp_server: ServerFactory,
    certs: Certs,
    pipelining: bool,
    reply: str,
    error: type[Exception],
    reason: str,
) -> None:
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.data_replies = [reply]
    metrics, result = send_with(relay(server, certs), max_attempts=1)
    assert isinstance(result, error) and result.reason == reason  # type: ignore[attr-defined]
    assert server.handler.data_commands == 1


@BOTH
def test_lines_starting_with_a_dot_arrive_intact(
    smtp_server: ServerFactory, certs: Certs, pipelining: bool
) -> None:
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    mail = make_mail()
    data = mail.data + b".\r\n..two dots\r\n.one dot\r\n"
    _, result = send_with(relay(server, certs), mail=dataclasses.replace(mail, data=data))
    assert result == f"127.0.0.1:{server.port}"
    assert server.received[0].data.endswith(b".\r\n..two dots\r\n.one dot\r\n")


@BOTH
@pytest.mark.parametrize(
    ("bad", "mail_sent"),
    # aiosmtplib checks every address's syntax before MAIL; control characters only
    # when a command is written, so one by one, MAIL and the first RCPT go out first.
    [("a b@example.com", False), ("x@example.com\x00", None)],
    ids=["space", "nul"],
)
def test_an_address_that_would_inject_is_refused_before_it_is_sent(
    smtp_server: ServerFactory,
    certs: Certs,
    proxies: Callable[[SmtpServer], TcpProxy],
    pipelining: bool,
    bad: str,
    mail_sent: bool | None,
) -> None:
    server = smtp_server("plain", context=None)
    server.handler.pipelining = pipelining
    proxy = proxies(server)
    mail = dataclasses.replace(make_mail(), recipients=("ok@example.com", bad))
    _, result = send_with(relay(server, certs, port=proxy.port, security="none"), mail=mail)
    assert isinstance(result, PermanentError) and result.reason == "rejected_5xx"
    sent = b"".join(proxy.sent)
    assert bad.encode() not in sent and b"DATA" not in sent
    # Pipelined, every command is checked before the one write.
    assert (b"MAIL" in sent) == (mail_sent if mail_sent is not None else not pipelining)
    assert server.received == []


@BOTH
def test_an_address_carrying_a_command_is_cut_to_the_mailbox(
    smtp_server: ServerFactory,
    certs: Certs,
    proxies: Callable[[SmtpServer], TcpProxy],
    pipelining: bool,
) -> None:
    server = smtp_server("plain", context=None)
    server.handler.pipelining = pipelining
    proxy = proxies(server)
    bad = "x@example.com>\r\nRCPT TO:<evil@example.com"
    mail = dataclasses.replace(make_mail(), recipients=("ok@example.com", bad))
    _, result = send_with(relay(server, certs, port=proxy.port, security="none"), mail=mail)
    assert result == f"127.0.0.1:{proxy.port}"
    assert b"evil" not in b"".join(proxy.sent)
    assert server.received[0].rcpt_tos == ["ok@example.com", "x@example.com"]


@BOTH
def test_a_cancelled_send_closes_its_connection(
    smtp_server: ServerFactory, certs: Certs, pipelining: bool
) -> None:
    """A send cancelled mid-transaction (the worker's max_hold, a shutdown) leaves the
    session in an unknown state: it is closed, neither pooled nor left open."""
    from worker.send import Sender

    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.data_delay = 30.0  # the relay sits on the message
    config = relay(server, certs, timeout=60.0)
    sender = Sender([config], Metrics([config.label]))

    def open_sessions() -> int:
        return sum(p.transport is not None for p in server._protocols)

    async def go() -> None:
        task = asyncio.create_task(sender.send(make_mail()))
        await asyncio.to_thread(
            wait_until, lambda: server.handler.data_commands == 1, 10, "the DATA command"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sender.relays[0]._idle == []
        await asyncio.to_thread(
            wait_until, lambda: open_sessions() == 0, 5, "the relay to see the session closed"
        )
        await sender.close()

    asyncio.run(go())


def test_without_pipelining_each_command_waits_for_the_previous_reply(
    smtp_server: ServerFactory,
    certs: Certs,
    proxies: Callable[[SmtpServer], TcpProxy],
) -> None:
    """Two mails at once on one connection of a relay that does not offer PIPELINING:
    one command per write, and the second mail only after the first one's reply."""
    server = smtp_server("plain", context=None)
    proxy = proxies(server)
    config = relay(server, certs, port=proxy.port, security="none", max_connections=1)

    from worker.relay import Relay

    first, second = make_mail(to=("first@example.com",)), make_mail(to=("second@example.com",))

    async def go() -> list[object]:
        pool = Relay(config)
        try:
            return await asyncio.gather(pool.send(first), pool.send(second))
        finally:
            await pool.close()

    assert asyncio.run(go()) == [{}, {}]
    sent = [c for c in proxy.sent if not c.startswith((b"EHLO", b"QUIT"))]
    assert [c.split(b":")[0] for c in sent if not c.endswith(b"\r\n.\r\n")] == [
        *(b"MAIL FROM", b"RCPT TO", b"DATA\r\n") * 2
    ]
    assert [i for i, c in enumerate(sent) if c.endswith(b"\r\n.\r\n")] == [3, 7]
    assert [r.rcpt_tos for r in server.received] == [["first@example.com"], ["second@example.com"]]
    assert server.handler.connections == 1


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


REPLIES = b"250 sender ok\r\n250-first\r\n250 rcpt ok\r\n550 no such user\r\n354 go ahead\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        [REPLIES],  # all replies in one read
        [bytes([b]) for b in REPLIES],  # one byte per read
        [REPLIES[:20], REPLIES[20:45], REPLIES[45:]],  # cut in the middle of lines
    ],
    ids=["together", "bytewise", "cut"],
)
def test_replies_are_kept_however_they_arrive(chunks: list[bytes]) -> None:
    """Unit test of the protocol: aiosmtplib's own drops a reply that arrives while the
    previous one waits to be picked up, and leaves a second reply of one read unparsed."""
    from worker.pipelining import PipeliningProtocol

    async def go() -> list[tuple[int, str]]:
        protocol = PipeliningProtocol(loop=asyncio.get_running_loop())
        transport = _Transport()
        protocol.connection_made(transport)
        protocol._response_pending = False  # no greeting in this test
        commands = [[b"MAIL", b"FROM:<a@b>"], [b"RCPT", b"TO:<c@d>"], [b"RCPT", b"TO:<e@f>"]]
        payload = b"".join(b" ".join(c) + b"\r\n" for c in [*commands, [b"DATA"]])
        replies = protocol.send_group(payload, 4)
        assert transport.written == [
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
        ]
        # Every chunk is delivered before the reader runs again: the worst case.
        for chunk in chunks:
            protocol.data_received(chunk)
        return [(r.code, r.message) for r in await asyncio.gather(*replies)]

    assert asyncio.run(go()) == [
        (250, "sender ok"),
        (250, "first\nrcpt ok"),
        (550, "no such user"),
        (354, "go ahead"),
    ]


def test_a_mail_cancelled_as_its_reply_comes_in_stops_there() -> None:
    """A mail abandoned at a reconnect is cancelled, and its message goes back to the
    broker. Should its reply (the 354 to DATA, say) come in the same pass of the loop as
    the cancel, the mail must still stop, not go on to send its body: Python 3.11's
    wait_for returned the reply instead, and the mail went out twice."""
    from aiosmtplib.response import SMTPResponse

    from worker.pipelining import _reply

    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[SMTPResponse] = loop.create_future()
        steps: list[str] = []

        waiting = asyncio.Event()

        async def mail() -> None:
            waiting.set()  # the task runs on into _reply, and stops there, before we resume
            await _reply(reply, 30.0)
            steps.append("went on to send its body")

        task = loop.create_task(mail())
        await waiting.wait()
        reply.set_result(SMTPResponse(354, "go ahead"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps

    assert asyncio.run(go()) == []


def test_a_reply_read_with_an_earlier_one_is_taken_without_waiting() -> None:
    """Unit test: most replies of a group come in one read with the first, and taking one
    must not cost a timer and a pass of the loop (a coroutine that never suspends ends at
    its first step); one the connection failed raises as before, and one still to come
    is waited for."""
    from aiosmtplib import SMTPServerDisconnected
    from aiosmtplib.response import SMTPResponse

    from worker.pipelining import _reply

    async def go() -> None:
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        read.set_result(SMTPResponse(250, "ok"))
        step = _reply(read, 30.0)
        with pytest.raises(StopIteration) as stopped:
            step.send(None)
        assert stopped.value.value == SMTPResponse(250, "ok")
        failed = loop.create_future()
        failed.set_exception(SMTPServerDisconnected("Connection lost"))
        with pytest.raises(SMTPServerDisconnected):
            await _reply(failed, 30.0)
        later = loop.create_future()
        loop.call_soon(later.set_result, SMTPResponse(354, "go ahead"))
        assert await _reply(later, 30.0) == SMTPResponse(354, "go ahead")

    asyncio.run(go())


@pytest.mark.parametrize(
    ("mail_reply", "rcpt_reply", "error"),
    [
        ("550 5.7.1 no", "503 5.5.1 need MAIL", "SMTPSenderRefused"),
        ("250 ok", "550 5.1.1 no such user", "SMTPRecipientsRefused"),
    ],
    ids=["sender-refused", "recipients-refused"],
)
def test_a_354_after_a_refused_envelope_gets_an_empty_message(
    mail_reply: str, rcpt_reply: str, error: str
) -> None:
    """RFC 2920 3.1: a relay that accepts DATA although it refused the envelope gets a
    lone "." (aiosmtpd always refuses such a DATA, so a scripted relay plays this one)."""
    import aiosmtplib

    from worker.pipelining import sendmail

    heard: list[bytes] = []

    async def relay_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        replies = {
            b"EHLO": b"250-relay.test\r\n250 PIPELINING\r\n",
            b"MAIL": mail_reply.encode() + b"\r\n",
            b"RCPT": rcpt_reply.encode() + b"\r\n",
            b"DATA": b"354 go ahead\r\n",
            b".": b"554 5.5.1 no valid recipients\r\n",
            b"RSET": b"250 ok\r\n",
            b"QUIT": b"221 bye\r\n",
        }
        writer.write(b"220 relay.test\r\n")
        while line := await reader.readline():
            heard.append(line.rstrip(b"\r\n"))
            writer.write(replies[line.split()[0].rstrip(b"\r\n")])

    async def go() -> str:
        server = await asyncio.start_server(relay_session, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=5)
        await client.connect()
        try:
            await sendmail(client, "a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        except aiosmtplib.SMTPException as exc:
            return type(exc).__name__
        finally:
            client.close()
            server.close()
        return "sent"

    assert asyncio.run(go()) == error
    assert heard[0].startswith(b"EHLO ")
    assert [h.split(b":")[0] for h in heard[1:]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"DATA",
        b".",
        b"RSET",
    ]


@BOTH
def test_a_421_to_a_recipient_ends_the_session(
    smtp_server: ServerFactory, certs: Certs, pipelining: bool
) -> None:
    """One by one, aiosmtplib closes on a 421 and the next command finds the connection
    gone; pipelined, the replies after a 421 are not waited for, with the same outcome."""
    server = smtp_server("starttls")
    server.handler.pipelining = pipelining
    server.handler.rcpt_replies = {"b@example.com": "421 4.3.2 closing"}
    mail = make_mail(to=("a@example.com", "b@example.com", "c@example.com"))
    _, result = send_with(relay(server, certs), mail=mail, max_attempts=1)
    assert isinstance(result, TransientError) and result.reason == "disconnected"
    assert server.received == []
    wait_until(lambda: all(p.transport is None for p in server._protocols), 5, "the session closed")


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b" "]), max_size=40))
def test_the_body_is_normalized_and_dot_stuffed_exactly_as_aiosmtplib_does(
    parts: list[bytes],
) -> None:
    """The cheap checks that skip aiosmtplib's regexes when they would change nothing
    give aiosmtplib's own result for every message, the ones they skip included."""
    message = b"".join(parts)
    normalized = pipelining._line_endings(message)
    assert normalized == normalize_message_line_endings(message)
    assert pipelining._dot_stuffed(normalized) == PERIOD_REGEX.sub(b"..", normalized)
