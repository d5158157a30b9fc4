"""SMTP PIPELINING (RFC 2920) on top of aiosmtplib: MAIL FROM, every RCPT TO and DATA in
one write, then their replies read in order. The body's reply is not waited for before
the connection may carry the next mail: RFC 2920 3.1 lets the message content be the
first "command" of a group, so the next mail's envelope goes out behind it, and in a
steady stream a mail costs one round trip to the relay instead of three plus one per
recipient.

:class:`PipeliningProtocol` keeps, per connection, the replies still owed, in the order
their commands were written: every write of a group adds one future per command in the
same synchronous step, and each complete reply resolves the oldest one, so a reply can
only ever go to the command it answers. After a 421 (the relay is closing the channel)
or a garbled reply, and when the connection is lost or closed, every reply still owed
fails with :class:`aiosmtplib.SMTPServerDisconnected`. While nothing is owed, aiosmtplib's
own reading is used, so EHLO, STARTTLS, AUTH, NOOP, RSET and QUIT work as before; they
are only ever issued once nothing is owed (see :func:`settled`). aiosmtplib builds its
protocol inside ``SMTP._create_connection`` with no hook for another class, so the
connected protocol's class is switched to the subclass, whose state has class defaults.

Everything else is aiosmtplib's: the address checks of ``sendmail`` (``parse_address``
and ``quote_address``), the control-character check of ``execute_command`` (applied to
every command before the one write), the SIZE parameter, the dot-stuffing of the body,
closing on a timeout, a disconnect or a 421, and RSET after a refused envelope. The
outcome raises the same exceptions ``SMTP.sendmail`` raises, step by step, so it is
classified as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.errors import SMTPReadTimeoutError
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

__all__ = [
    "Pending",
    "PipeliningProtocol",
    "begin",
    "close",
    "close_after_owed",
    "owed",
    "sendmail",
    "settled",
]

log = logging.getLogger(__name__)

_ACCEPTED_RCPT = (SMTPStatus.completed, SMTPStatus.will_forward)

Reply = asyncio.Future[SMTPResponse]


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to commands written together,
    and to a group written while earlier replies are still owed."""

    # Class defaults, as there is no __init__ (see the module docstring).
    _owed: deque[Reply] | None = None  # the replies still owed, oldest first
    _ended = False  # a 421, a garbled reply or a close: no group may be written any more

    @property
    def owed(self) -> int:
        return len(self._owed) if self._owed else 0

    def send_group(self, payload: bytes, count: int) -> list[Reply]:
        """Write ``payload`` (``count`` commands, or a message's content and its ".")
        and return the futures of their replies, in order. Nothing is awaited between
        the write and the queueing, so the queue's order is the order on the wire."""
        if self._command_lock is None or self._ended:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        if self._command_lock.locked():
            # An aiosmtplib command awaits its reply: ours would be taken for it.
            raise RuntimeError("a group written during an aiosmtplib command")
        if self._owed is None:
            self._owed = deque()
        if not self._owed:
            # Nothing is owed: bytes left over are not a reply to anything, and must not
            # be taken for this group's (aiosmtplib ignores those too).
            del self._buffer[:]
        self.write(payload)
        replies = [self._loop.create_future() for _ in range(count)]
        self._owed.extend(replies)
        return replies

    def data_received(self, data: bytes) -> None:
        owed = self._owed
        if not owed:
            super().data_received(data)
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH * len(owed):
            self._end(
                aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response.value, "Response too long"
                )
            )
            return
        while owed:
            try:
                response = self._read_response_from_buffer()
            except Exception as exc:
                self._end(exc)
                return
            if response is None:
                return  # the rest of it is still on its way
            reply = owed.popleft()
            if not reply.done():
                reply.set_result(response)
            if response.code == SMTPStatus.domain_unavailable:
                # A 421: the relay answers nothing more on this channel.
                self._end(aiosmtplib.SMTPServerDisconnected(f"{response}"))
                return
        del self._buffer[:]  # not a reply to anything (see send_group)

    def _end(self, first: BaseException) -> None:
        """Fail every reply still owed: the oldest with ``first``, the others as
        disconnected, since the replies can no longer be told apart."""
        self._ended = True
        del self._buffer[:]
        owed, self._owed = self._owed, None
        for n, reply in enumerate(owed or ()):
            if not reply.done():
                error = first if n == 0 else aiosmtplib.SMTPServerDisconnected("Connection lost")
                self._set_response_exception(reply, error)

    def abandon(self) -> None:
        """The connection is being closed: nothing owed will come."""
        self._end(aiosmtplib.SMTPServerDisconnected("Connection closed"))

    def eof_received(self) -> bool:
        self._end(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._end(lost)
        super().connection_lost(exc)

    async def settled(self) -> None:
        """Wait until nothing is owed, whatever the replies turn out to be. A reply
        leaves the queue only as it is resolved, so the newest one is the last to."""
        while self._owed:
            await asyncio.wait([self._owed[-1]])


def _protocol(client: aiosmtplib.SMTP) -> PipeliningProtocol:
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    if not isinstance(protocol, PipeliningProtocol):
        protocol.__class__ = PipeliningProtocol
    assert isinstance(protocol, PipeliningProtocol)
    return protocol


def owed(client: aiosmtplib.SMTP) -> int:
    """How many replies are still owed on ``client``'s connection (to mails whose body
    went out, or to a group being read)."""
    protocol = client.protocol
    return protocol.owed if isinstance(protocol, PipeliningProtocol) else 0


async def settled(client: aiosmtplib.SMTP) -> None:
    """Wait until no reply is owed on ``client``'s connection: before any aiosmtplib
    command (NOOP, RSET, QUIT), whose reply would otherwise be read as ours."""
    protocol = client.protocol
    if isinstance(protocol, PipeliningProtocol):
        await protocol.settled()


def close(client: aiosmtplib.SMTP) -> None:
    """``client.close()``, failing at once the replies still owed on its connection
    (the transport may take a while to report the loss, a TLS one especially)."""
    protocol = client.protocol
    if isinstance(protocol, PipeliningProtocol):
        protocol.abandon()
    client.close()


def close_after_owed(client: aiosmtplib.SMTP) -> None:
    """Close ``client`` as soon as every reply owed on it is in, without waiting here:
    for a mail that failed or was cancelled before its body went out, while a mail
    before it on the connection still waits for its body's reply. Closing at once would
    lose that reply, and the relay may well have taken that mail. No group may be
    written meanwhile; the caller holds the client, so it is not in the pool."""
    protocol = client.protocol
    if not isinstance(protocol, PipeliningProtocol) or not protocol.owed:
        close(client)
        return
    protocol._ended = True

    async def later() -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(protocol.settled(), client.timeout)
        finally:
            close(client)

    task = asyncio.get_running_loop().create_task(later())
    _closing.add(task)  # a task nobody holds may be collected before it runs
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


async def _reply(reply: Reply, timeout: float | None) -> SMTPResponse:
    """One owed reply, within the client's timeout. The future itself is shielded: it
    stays in the queue, so that a reply arriving later is still matched to it and
    dropped rather than handed to the next command."""
    if reply.done():
        # Read with an earlier reply of its group, as most are: waiting would cost a
        # timer, two futures and a pass of the loop for nothing.
        return reply.result()
    try:
        # Not wait_for: on Python 3.11 it drops a cancel that comes in the same pass of
        # the loop as the reply, and an abandoned mail would go on to send its body.
        async with asyncio.timeout(timeout):
            return await asyncio.shield(reply)
    except TimeoutError as exc:
        if reply.done() and not reply.cancelled() and reply.exception() is None:
            return reply.result()  # it came as the time ran out
        raise SMTPReadTimeoutError("Timed out waiting for server response") from exc


@dataclass(frozen=True, slots=True)
class Pending:
    """A mail whose body is written; ``result`` is the outcome once its reply is read.
    Meanwhile the connection may carry other mails: their replies queue up behind it.
    ``result`` closes the connection itself when it must (see there)."""

    client: aiosmtplib.SMTP
    reply: Reply | None  # None: the outcome is already known
    refused: dict[str, SMTPResponse]

    async def result(self) -> dict[str, SMTPResponse]:
        """The recipients refused while others were accepted, or the exception
        ``SMTP.sendmail`` would raise for the body's reply."""
        if self.reply is None:
            return self.refused
        try:
            final = await _reply(self.reply, self.client.timeout)
        except Exception:
            # Disconnected, timed out or garbled: the replies are out of step now.
            close(self.client)
            raise
        except BaseException:
            # Cancelled: with the reply still to come, the session is in an unknown
            # state. Once it is in, the connection is fine, and a mail behind this one
            # may already be sending its body on it.
            if not self.reply.done():
                close(self.client)
            raise
        if final.code == SMTPStatus.domain_unavailable:
            close(self.client)  # the relay is closing the channel
        # A refused body needs neither RSET nor a new connection: the transaction ended
        # with the reply, and another mail may already follow on the connection.
        if final.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(final.code, final.message)
        return self.refused


async def sendmail(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """``client.sendmail(sender, recipients, message)``, pipelined when the relay offers
    PIPELINING; returns the recipients refused while others were accepted."""
    pending = await begin(client, sender, recipients, message)
    return await pending.result()


async def begin(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes
) -> Pending:
    """Everything of :func:`sendmail` up to the body's reply, which the result reads.
    The client must not be used by anything else until this returns; after that another
    mail may begin on it (the relay's pool hands it to one mail at a time). Without
    PIPELINING, the whole of ``client.sendmail``."""
    # Every address is checked before anything is sent, as sendmail does.
    from_ = _quoted(sender)
    to = [_quoted(recipient) for recipient in recipients]
    await client._ehlo_or_helo_if_needed()  # a pooled client has done it: nothing is sent
    if not client.supports_extension("pipelining"):
        refused, _ = await client.sendmail(sender, list(recipients), message)
        return Pending(client, None, refused)
    # Once, for both the SIZE parameter and the body (the regex costs per byte).
    message = _line_endings(message)
    mail = [b"MAIL", b"FROM:" + from_.encode("ascii")]
    if client.supports_extension("size"):
        mail.append(b"size=%d" % len(message))
    commands = [mail, *([b"RCPT", b"TO:" + r.encode("ascii")] for r in to), [b"DATA"]]
    try:
        return await _transact(client, sender, recipients, message, commands)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        # The replies are out of step with the commands now.
        close(client)
        raise
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        # Reset the envelope; the refusal is what matters, so RSET's fate is not reported
        # (as in sendmail). Nothing is owed by then: every reply of this mail was read.
        if client.is_connected:
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await settled(client)
                await client.rset()
        raise


def _line_endings(message: bytes) -> bytes:
    """aiosmtplib's ``normalize_message_line_endings``, which a rendered mail needs only
    rarely: its lines already end in CRLF. Counting is far cheaper per byte than the
    regex's substitution, which copies the whole message even when it changes nothing."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") == crlf == message.count(b"\n") and message.endswith(b"\r\n"):
        return message
    return normalize_message_line_endings(message)


def _dot_stuffed(message: bytes) -> bytes:
    """aiosmtplib's dot-stuffing (a line that starts with "." gets one more), skipped
    when no line starts with one, which a find tells at a fraction of the regex's cost.
    ``message`` has CRLF line endings (see :func:`_line_endings`)."""
    if message.startswith(b".") or b"\n." in message:
        return PERIOD_REGEX.sub(b"..", message)
    return message


@functools.lru_cache(maxsize=1024)
def _quoted(address: str) -> str:
    """aiosmtplib's check and quoting of an address, remembered: every mail has the same
    few (the configured sender and recipients), and the check parses with the standard
    library's address parser, which cost more than any other step of a mail. What it
    refuses raises each time, as errors are not cached."""
    return quote_address(address)  # parse_address's checks, then the angle brackets


async def _read_group(
    protocol: PipeliningProtocol, commands: Sequence[Sequence[bytes]], timeout: float | None
) -> list[SMTPResponse]:
    """Write ``commands`` in one go and read their replies in order. Stops after a
    421: the server is closing the channel and will answer nothing more."""
    for command in commands:
        for arg in command:
            if COMMAND_INJECTION_REGEX.search(arg):
                raise ValueError("Command arg contains a prohibited control character")
    payload = b"".join(b" ".join(command) + b"\r\n" for command in commands)
    replies: list[SMTPResponse] = []
    for future in protocol.send_group(payload, len(commands)):
        reply = await _reply(future, timeout)
        replies.append(reply)
        if reply.code == SMTPStatus.domain_unavailable:
            break
    return replies


async def _transact(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    commands: list[list[bytes]],
) -> Pending:
    protocol = _protocol(client)
    timeout = client.timeout
    replies = await _read_group(protocol, commands, timeout)
    if len(replies) < len(commands) or replies[-1].code == SMTPStatus.domain_unavailable:
        # A 421: the relay is closing the channel (SMTP.execute_command closes on it too).
        close(client)
    mail, rcpts = replies[0], replies[1 : 1 + len(recipients)]
    refused = [
        aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
        for recipient, reply in zip(recipients, rcpts, strict=False)
        if reply.code not in _ACCEPTED_RCPT
    ]
    data = replies[-1] if len(replies) == len(commands) else None
    envelope_ok = mail.code == SMTPStatus.completed and len(refused) < len(recipients)
    if data is not None and data.code == SMTPStatus.start_input and not envelope_ok:
        # RFC 2920 3.1: the relay should have refused DATA; end it with an empty message.
        log.warning("relay accepted DATA without a sender or a recipient; sending '.'")
        (empty,) = protocol.send_group(b".\r\n", 1)
        await _reply(empty, timeout)
    # Each step as sendmail judges it: MAIL first, then the recipients, then DATA.
    if mail.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
    if data is None:
        # A 421 to a RCPT: sendmail would have found the connection closed next.
        last = replies[-1]
        raise aiosmtplib.SMTPServerDisconnected(f"{last.code} {last.message}")
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    if data.code != SMTPStatus.start_input:
        raise aiosmtplib.SMTPDataError(data.code, data.message)
    # The message, its line endings already normalized, dot-stuffed as
    # execute_data_command does; its reply is read by Pending.result.
    (final,) = protocol.send_group(_dot_stuffed(message) + b".\r\n", 1)
    return Pending(client, final, {r.recipient: SMTPResponse(r.code, r.message) for r in refused})
