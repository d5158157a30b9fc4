"""SMTP PIPELINING (RFC 2920) on top of aiosmtplib: MAIL FROM, every RCPT TO and DATA in
one write, then their replies read in order, so a mail costs two round trips to the relay
(envelope, then body) instead of three plus one per recipient.

aiosmtplib's protocol expects one reply per command: replies that arrive together stay
unparsed in its buffer, and one that arrives while the previous is still waiting to be
picked up is dropped. :class:`PipeliningProtocol` keeps them. aiosmtplib builds its
protocol inside ``SMTP._create_connection`` with no hook for another class, so the
connected protocol's class is switched to the subclass, which adds no state of its own.

Everything else is aiosmtplib's: the address checks of ``sendmail`` (``parse_address``
and ``quote_address``), the control-character check of ``execute_command`` (applied to
every command before the one write), the SIZE parameter, the dot-stuffing of the body,
closing on a timeout, a disconnect or a 421, and RSET after a refusal. The outcome raises
the same exceptions ``SMTP.sendmail`` raises, step by step, so it is classified as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus

__all__ = ["PipeliningProtocol", "sendmail"]

log = logging.getLogger(__name__)

_ACCEPTED_RCPT = (SMTPStatus.completed, SMTPStatus.will_forward)


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to commands written together."""

    _owed = 0  # replies still expected for a group; a class default, as there is no __init__

    def data_received(self, data: bytes) -> None:
        if not self._owed:
            super().data_received(data)
            return
        if self._response_waiter is None:
            return  # connection lost
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH * self._owed:
            del self._buffer[:]
            if not self._response_waiter.done():
                self._set_response_exception(
                    self._response_waiter,
                    aiosmtplib.SMTPResponseException(
                        SMTPStatus.invalid_response.value, "Response too long"
                    ),
                )
            return
        self._hand_over()

    def _hand_over(self) -> None:
        """Give the next complete reply in the buffer to the waiting reader, if it has
        none yet; the others stay buffered for the next reads."""
        waiter = self._response_waiter
        if waiter is None or waiter.done():
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:
            del self._buffer[:]
            self._set_response_exception(waiter, exc)
            return
        if response is not None:
            waiter.set_result(response)

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        if self._owed:
            self._hand_over()  # the reply may have come with the previous one
        return await super().read_response(timeout=timeout)

    async def execute_pipelined(
        self, commands: Sequence[Sequence[bytes]], timeout: float | None = None
    ) -> list[SMTPResponse]:
        """Write ``commands`` in one go and read their replies in order. Stops after a
        421: the server is closing the channel and will answer nothing more."""
        for command in commands:
            for arg in command:
                if COMMAND_INJECTION_REGEX.search(arg):
                    raise ValueError("Command arg contains a prohibited control character")
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies: list[SMTPResponse] = []
        async with self._command_lock:
            self._owed = len(commands)
            try:
                self._response_pending = True
                self.write(b"".join(b" ".join(command) + b"\r\n" for command in commands))
                while self._owed:
                    reply = await self.read_response(timeout=timeout)
                    self._owed -= 1
                    replies.append(reply)
                    if reply.code == SMTPStatus.domain_unavailable:
                        break
            finally:
                self._owed = 0
                # Nothing is owed now: bytes left over are not a reply to anything, and
                # must not be taken for the next command's (aiosmtplib ignores those too).
                del self._buffer[:]
        return replies

    async def execute_message(
        self, message: bytes | None, timeout: float | None = None
    ) -> SMTPResponse:
        """After a 354: the message, its line endings already normalized (see
        :func:`sendmail`), dot-stuffed as ``execute_data_command`` does; or with None a
        lone ".", the empty message RFC 2920 3.1 asks for when DATA was accepted although
        the envelope was not."""
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        payload = b".\r\n" if message is None else PERIOD_REGEX.sub(b"..", message) + b".\r\n"
        async with self._command_lock:
            self._response_pending = True
            self.write(payload)
            return await self.read_response(timeout=timeout)


def _protocol(client: aiosmtplib.SMTP) -> PipeliningProtocol:
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    if not isinstance(protocol, PipeliningProtocol):
        protocol.__class__ = PipeliningProtocol
    assert isinstance(protocol, PipeliningProtocol)
    return protocol


async def sendmail(
    client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """``client.sendmail(sender, recipients, message)``, pipelined when the relay offers
    PIPELINING; returns the recipients refused while others were accepted. The client
    must not be used by anything else meanwhile (the relay's pool hands it to one mail
    at a time)."""
    # Every address is checked before anything is sent, as sendmail does.
    from_ = _quoted(sender)
    to = [_quoted(recipient) for recipient in recipients]
    await client._ehlo_or_helo_if_needed()
    if not client.supports_extension("pipelining"):
        refused, _ = await client.sendmail(sender, list(recipients), message)
        return refused
    # Once, for both the SIZE parameter and the body (the regex costs per byte).
    message = normalize_message_line_endings(message)
    mail = [b"MAIL", b"FROM:" + from_.encode("ascii")]
    if client.supports_extension("size"):
        mail.append(b"size=%d" % len(message))
    commands = [mail, *([b"RCPT", b"TO:" + r.encode("ascii")] for r in to), [b"DATA"]]
    try:
        return await _transact(client, sender, recipients, message, commands)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        # The replies are out of step with the commands now.
        client.close()
        raise
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        # Reset the envelope; the refusal is what matters, so RSET's fate is not reported
        # (as in sendmail).
        if client.is_connected:
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await client.rset()
        raise


@functools.lru_cache(maxsize=1024)
def _quoted(address: str) -> str:
    """aiosmtplib's check and quoting of an address, remembered: every mail has the same
    few (the configured sender and recipients), and the check parses with the standard
    library's address parser, which cost more than any other step of a mail. What it
    refuses raises each time, as errors are not cached."""
    return quote_address(address)  # parse_address's checks, then the angle brackets


async def _transact(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    commands: list[list[bytes]],
) -> dict[str, aiosmtplib.SMTPResponse]:
    protocol = _protocol(client)
    timeout = client.timeout
    replies = await protocol.execute_pipelined(commands, timeout=timeout)
    if len(replies) < len(commands) or replies[-1].code == SMTPStatus.domain_unavailable:
        # A 421: the relay is closing the channel (SMTP.execute_command closes on it too).
        client.close()
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
        await protocol.execute_message(None, timeout=timeout)
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
    final = await protocol.execute_message(message, timeout=timeout)
    if final.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(final.code, final.message)
    return {r.recipient: aiosmtplib.SMTPResponse(r.code, r.message) for r in refused}
