"""PIPELINING across mails (RFC 2920 3.1): on a relay that offers it, the next mail's
envelope follows the previous mail's body on the same connection without waiting for the
body's reply, and still every reply goes to the mail it answers. A scripted relay holds
its reply to the first body until the next mail's whole envelope (MAIL, RCPT, DATA) has
arrived behind it, so the interleaving is forced, not left to timing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from shared.config import SmtpRelay
from shared.errors import PermanentError, TransientError
from tests.test_send_tls import make_mail
from worker.relay import Refusal, Relay

pytestmark = pytest.mark.integration

FIRST = make_mail(to=("first@example.com",))
SECOND = make_mail(to=("second@example.com",))
Sent = dict[str, Refusal]
HOLD_DEADLINE = 3.0  # how long the relay holds the first body's reply for the next mail


@dataclasses.dataclass
class ScriptedRelay:
    """A plaintext relay answering in order, as a pipelining server must. Its reply to
    the first body of all is held until the next mail's DATA command has been read (or
    the deadline passes); replies owed meanwhile queue up behind it."""

    body_replies: list[bytes] = dataclasses.field(default_factory=list)  # then 250
    release: asyncio.Event | None = None  # if set, the held reply also waits for it
    sessions: list[list[bytes]] = dataclasses.field(default_factory=list)
    delivered: list[tuple[str, ...]] = dataclasses.field(default_factory=list)  # per 250
    # Whether the next envelope arrived while the first body's reply was held.
    behind: bool | None = None
    envelope_behind: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    ended: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # a session
    _held: list[bytes] | None = None  # the held reply, then those queued behind it
    _holding_done: bool = False

    def _out(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        if self._held is not None:
            self._held.append(reply)
        else:
            writer.write(reply)

    async def _flush(self, writer: asyncio.StreamWriter, behind: bool) -> None:
        self.behind = behind
        if behind:
            self.envelope_behind.set()
            if self.release is not None:
                await self.release.wait()
        held, self._held = self._held or [], None
        if not writer.is_closing():
            writer.write(b"".join(held))

    async def _line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        if self._held is None:
            return await reader.readline()
        try:
            return await asyncio.wait_for(reader.readline(), HOLD_DEADLINE)
        except TimeoutError:
            await self._flush(writer, behind=False)
            return await reader.readline()

    @staticmethod
    async def _body(reader: asyncio.StreamReader) -> bool:
        """Read a message up to its lone "."; False if the connection ends first."""
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                return False
        return True

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard: list[bytes] = []
        self.sessions.append(heard)
        writer.write(b"220 relay.test\r\n")
        rcpts: list[str] = []
        hang_up = False
        while line := await self._line(reader, writer):
            heard.append(line.rstrip(b"\r\n"))
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-relay.test\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                rcpts = []
                self._out(writer, b"250 sender ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.decode().split("<")[1].split(">")[0])
                self._out(writer, b"250 rcpt ok\r\n")
            elif verb == b"DATA":
                self._out(writer, b"354 go ahead\r\n")
                if self._held is not None:
                    await self._flush(writer, behind=True)
                if not await self._body(reader):
                    break  # the client went away in the middle of the body
                heard.append(b".")
                reply = self.body_replies.pop(0) if self.body_replies else b"250 queued\r\n"
                if reply.startswith(b"250"):
                    self.delivered.append(tuple(rcpts))
                if not self._holding_done:
                    self._holding_done = True
                    self._held = [reply]
                else:
                    self._out(writer, reply)
                if reply.startswith(b"421"):
                    hang_up = True
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:  # RSET, NOOP
                self._out(writer, b"250 ok\r\n")
            if hang_up and self._held is None:
                break  # a 421 is the last thing the relay says
        writer.close()
        self.ended.set()


async def _send_two(
    script: ScriptedRelay,
    during: Callable[[asyncio.Task[Sent], asyncio.Task[Sent]], Awaitable[None]] | None = None,
) -> list[object]:
    """FIRST then SECOND, concurrently, through one relay allowing one connection:
    SECOND waits for FIRST's connection slot."""
    server = await asyncio.start_server(script.session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = SmtpRelay(host="127.0.0.1", port=port, security="none", timeout=5.0, max_connections=1)
    pool = Relay(config)
    try:
        first = asyncio.create_task(pool.send(FIRST))
        second = asyncio.create_task(pool.send(SECOND))
        if during is not None:
            await during(first, second)
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 15)
    finally:
        await pool.close()
        server.close()


def test_the_next_envelope_follows_the_body_without_waiting_for_its_reply() -> None:
    script = ScriptedRelay()
    results = asyncio.run(_send_two(script))
    assert results == [{}, {}]
    assert script.behind is True, "SECOND's envelope waited for FIRST's body's reply"
    assert script.delivered == [("first@example.com",), ("second@example.com",)]
    assert len(script.sessions) == 1
    assert [h.split(b":")[0] for h in script.sessions[0][1:]] == [
        *(b"MAIL FROM", b"RCPT TO", b"DATA", b".") * 2,
        b"QUIT",
    ]


def test_a_refused_body_is_its_own_mails_and_the_next_one_goes_out() -> None:
    script = ScriptedRelay(body_replies=[b"554 5.6.0 message refused\r\n"])
    first, second = asyncio.run(_send_two(script))
    assert isinstance(first, PermanentError) and first.reason == "rejected_5xx"
    assert "554 5.6.0 message refused" in first.detail
    assert second == {}
    assert script.behind is True
    # The refusal ended FIRST's transaction, not the session: SECOND, whose envelope
    # and maybe body were already on the wire behind FIRST's, goes out on it, once.
    assert script.delivered == [("second@example.com",)]
    assert len(script.sessions) == 1


def test_a_421_after_the_body_fails_that_mail_and_the_next_is_resent_once() -> None:
    script = ScriptedRelay(body_replies=[b"421 4.3.2 closing\r\n"])
    first, second = asyncio.run(_send_two(script))
    assert isinstance(first, TransientError) and first.reason == "rejected_4xx"
    assert "421 4.3.2 closing" in first.detail
    assert second == {}
    assert script.behind is True
    assert script.delivered == [("second@example.com",)]
    assert len(script.sessions) == 2
    assert b"RCPT TO:<second@example.com>" in script.sessions[0]  # queued behind the 421


def test_a_cancelled_mail_closes_its_connection_and_the_next_is_resent() -> None:
    """FIRST is cancelled (max_hold, a shutdown) while its body's reply is owed and
    SECOND's envelope is on the wire behind it. The relay then sends every reply it
    owes on that connection, if it is still open: FIRST's 250 must never be read as
    SECOND's, and SECOND must not be lost."""
    release = asyncio.Event()
    script = ScriptedRelay(release=release)

    async def cancel(first: asyncio.Task[Sent], second: asyncio.Task[Sent]) -> None:
        await asyncio.wait_for(script.envelope_behind.wait(), 5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()

    async def go() -> list[object]:
        return await _send_two(script, cancel)

    results = asyncio.run(go())
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1] == {}
    # The relay took FIRST (its reply never reached the client) and SECOND once, on a
    # second connection: the first one was closed at the cancellation.
    assert script.delivered == [("first@example.com",), ("second@example.com",)]
    assert len(script.sessions) == 2
    assert b"RCPT TO:<second@example.com>" in script.sessions[1]


def test_a_mail_cancelled_behind_another_lets_that_one_have_its_reply() -> None:
    """SECOND is cancelled once its envelope is on the wire behind FIRST's body, whose
    reply is still owed. SECOND's session is in an unknown state and is closed, but
    only after that reply: FIRST is reported sent on its own 250, once, and is not
    sent again (the relay took it already)."""
    release = asyncio.Event()
    script = ScriptedRelay(release=release)
    closed = asyncio.Event()

    async def cancel(first: asyncio.Task[Sent], second: asyncio.Task[Sent]) -> None:
        await asyncio.wait_for(script.envelope_behind.wait(), 5)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        await first
        await asyncio.wait_for(script.ended.wait(), 5)
        closed.set()

    results = asyncio.run(_send_two(script, cancel))
    assert results[0] == {}
    assert isinstance(results[1], asyncio.CancelledError)
    assert closed.is_set()
    assert script.delivered == [("first@example.com",)]
    assert len(script.sessions) == 1


def test_a_connection_owed_a_reply_is_not_probed_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled connection is probed with NOOP once it has been idle a while, timed from
    its last body. One whose body's reply is still owed is busy, not idle: probing it
    would wait for that reply under the probe's short timeout and then close it,
    reporting FIRST dropped although the relay took it (and sending it again)."""
    from worker import relay

    monkeypatch.setattr(relay, "PROBE_AFTER", 0.0)  # every pooled connection looks idle
    monkeypatch.setattr(relay, "PROBE_TIMEOUT", 0.5)  # well before the held reply comes
    script = ScriptedRelay()
    results = asyncio.run(_send_two(script))
    assert results == [{}, {}]
    assert script.behind is True
    assert script.delivered == [("first@example.com",), ("second@example.com",)]
    assert len(script.sessions) == 1
    assert b"NOOP" not in script.sessions[0]
