"""A real SMTP server for tests: aiosmtpd on its own event loop thread, on a free port,
with STARTTLS, implicit TLS (SMTPS) or plaintext, optional AUTH, and a record of what it
received, whether it came over TLS, and every byte a client sent it in the clear.

The server is deliberately permissive: it offers STARTTLS but also takes mail and AUTH
without it, as a careless or tampered relay would. Whether mail and passwords travel
encrypted is then up to the client under test, so assertions on ``Received.tls`` and
``cleartext`` can fail.

aiosmtpd's ``Controller`` cannot bind port 0 (its readiness check connects to the
configured port), so the server is started with ``loop.create_server`` instead, the way
aiosmtplib's own tests do.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

_MESSAGE_ID_RE = re.compile(rb"^Message-ID: <([^@>]+)@", re.MULTILINE | re.IGNORECASE)


def secret_forms(username: str, password: str) -> list[bytes]:
    """The password as it would cross the wire: as typed, and base64-encoded alone (AUTH
    LOGIN) or inside an AUTH PLAIN token, with or without an authorisation identity."""
    user, secret = username.encode(), password.encode()
    plain_tokens = (b"\0" + user + b"\0" + secret, user + b"\0" + user + b"\0" + secret)
    return [secret, base64.b64encode(secret), *map(base64.b64encode, plain_tokens)]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    auth_login: str | None
    helo: str | None = None  # the name the client gave in EHLO

    @property
    def event_id(self) -> str:
        """The event id from the Message-ID, found cheaply: load tests check it for
        hundreds of mails each time one arrives."""
        match = _MESSAGE_ID_RE.search(self.data)
        return match.group(1).decode() if match else ""

    def parsed(self) -> EmailMessage:
        message = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(message, EmailMessage)
        return message


SECRET = "{secret}"


def echoed(login: bytes, password: bytes) -> str:
    """What an echoing relay says back in place of ``{secret}``: the password as given,
    and the base64 forms AUTH LOGIN and AUTH PLAIN sent it in."""
    plain = base64.b64encode(b"\0" + login + b"\0" + password).decode()
    return f"{password.decode()} {base64.b64encode(password).decode()} {plain}"


def _echo(reply: str, session: Session) -> str:
    auth = session.auth_data
    if SECRET in reply and isinstance(auth, LoginPassword):
        return reply.replace(SECRET, echoed(auth.login, auth.password))
    return reply


@dataclass
class _Handler:
    received: list[Received] = field(default_factory=list)
    condition: threading.Condition = field(default_factory=threading.Condition)
    connections: int = 0
    # Fault injection: replies used (and consumed) for the next MAIL or DATA commands
    # instead of accepting, a delay before each DATA reply, and per-recipient RCPT
    # replies: a string for every RCPT of that address, or a list used up one reply per
    # RCPT (then the address is accepted), as greylisting does. A reply containing
    # ``{secret}`` echoes the password the client authenticated with (see ``echoed``).
    data_replies: list[str] = field(default_factory=list)
    data_delay: float = 0.0
    # A delay before the reply to the n-th DATA command (from 1), used once: a slow mail
    # among fast ones.
    data_delay_at: dict[int, float] = field(default_factory=dict)
    mail_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str | list[str]] = field(default_factory=dict)
    data_commands: int = 0
    # Replies used (and consumed) for the next DATA commands themselves, in place of 354:
    # only when the envelope has a recipient, as aiosmtpd checks that first.
    data_command_replies: list[str] = field(default_factory=list)
    rcpt_commands: list[str] = field(default_factory=list)
    # Close each connection after this many accepted mails (0: never), as some relays do.
    max_per_connection: int = 0
    # Offer PIPELINING (RFC 2920) in the EHLO reply. aiosmtpd does not by itself, but it
    # reads commands one line at a time from its buffer and answers them in order, which
    # is all a pipelining server has to do.
    pipelining: bool = False
    # Like a provider that takes mail only from its approved senders (empty: any sender).
    approved_senders: set[str] = field(default_factory=set)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With this hook aiosmtpd leaves recording the client's name to it.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_replies:
            return _echo(self.mail_replies.pop(0), session)
        if self.approved_senders and address not in self.approved_senders:
            return "550 5.7.1 sender not approved for this account"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    # Every byte clients sent before any TLS: what an eavesdropper would have seen.
    cleartext: bytearray = field(default_factory=bytearray)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpt_commands.append(address)
        reply = self.rcpt_replies.get(address)
        if isinstance(reply, list):
            reply = reply.pop(0) if reply else None
        if reply:
            return _echo(reply, session)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        delay = self.data_delay_at.pop(self.data_commands, self.data_delay)
        if delay:
            await asyncio.sleep(delay)
        if self.data_replies:
            return _echo(self.data_replies.pop(0), session)
        auth = session.auth_data
        # session.ssl covers STARTTLS; implicit TLS shows only on the transport.
        transport = server.transport
        implicit_tls = transport is not None and transport.get_extra_info("ssl_object")
        record = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            tls=session.ssl is not None or bool(implicit_tls),
            auth_login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            helo=session.host_name,
        )
        with self.condition:
            self.received.append(record)
            self.condition.notify_all()
        if self.max_per_connection:
            count = getattr(server, "_accepted", 0) + 1
            server._accepted = count  # type: ignore[attr-defined]
            if count >= self.max_per_connection and server.transport is not None:
                # Reply, then hang up, as relays with a per-connection quota do.
                asyncio.get_running_loop().call_soon(server.transport.close)
        return "250 OK"


class _Smtp(SMTP):
    """aiosmtpd, able to refuse the DATA command itself (see ``data_command_replies``), and
    keeping what arrives before TLS. After STARTTLS the raw socket feeds aiosmtpd's TLS
    protocol, which passes only decrypted bytes on; with implicit TLS the transport is
    encrypted from the start."""

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        encrypted = self._tls_protocol is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        if not encrypted:
            handler = self.event_handler
            assert isinstance(handler, _Handler)
            with handler.condition:
                handler.cleartext.extend(data)
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        assert isinstance(handler, _Handler)
        if handler.data_command_replies and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(handler.data_command_replies.pop(0))
            return
        await super().smtp_DATA(arg)


class _RejectingStartTls(_Smtp):
    """Advertises STARTTLS, then refuses it: a broken or tampered relay."""

    async def smtp_STARTTLS(self, arg: str) -> None:
        await self.push("454 4.7.0 TLS not available due to temporary reason")


class SmtpServer:
    def __init__(
        self,
        mode: Literal["starttls", "smtps", "plain"],
        tls_context: ssl.SSLContext | None,
        credentials: tuple[str, str] | None = None,
    ):
        self.mode = mode
        self.tls_context = tls_context
        self.credentials = credentials
        self.handler = _Handler()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._protocols: list[SMTP] = []
        self.reject_starttls = False
        # The largest mail it takes (advertised as SIZE, refused with 552 beyond it):
        # aiosmtpd's 32 MiB by default; Postfix ships with 10,240,000 bytes.
        self.data_size_limit = 32 * 1024 * 1024
        # A failed AUTH gets this reply (``{secret}`` echoes what the client sent), and
        # only these mechanisms are offered (None: aiosmtpd's LOGIN and PLAIN).
        self.auth_failure_reply: str | None = None
        self.auth_mechanisms: tuple[str, ...] | None = None
        # A reply to AUTH instead of checking the credentials, e.g. "454 4.7.0 try later".
        self.auth_reply: str | None = None

    @property
    def cleartext(self) -> bytes:
        """Everything clients sent this server before TLS, on every connection."""
        with self.handler.condition:
            return bytes(self.handler.cleartext)

    @property
    def received(self) -> list[Received]:
        with self.handler.condition:
            return list(self.handler.received)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Block until ``predicate(received)`` holds or ``timeout`` passes."""
        with self.handler.condition:
            return self.handler.condition.wait_for(
                lambda: predicate(self.handler.received), timeout
            )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if self.auth_reply:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        ok = (
            isinstance(data, LoginPassword)
            and self.credentials is not None
            and (data.login.decode(), data.password.decode()) == self.credentials
        )
        message = None
        if not ok and self.auth_failure_reply and isinstance(data, LoginPassword):
            message = self.auth_failure_reply.replace(SECRET, echoed(data.login, data.password))
        return AuthResult(
            success=ok, handled=False, message=message, auth_data=data if ok else None
        )

    def _protocol(self) -> SMTP:
        self.handler.connections += 1
        starttls = self.mode == "starttls"
        protocol = (_RejectingStartTls if self.reject_starttls else _Smtp)(
            self.handler,
            hostname="relay.test",
            data_size_limit=self.data_size_limit,
            # aiosmtpd offers STARTTLS exactly when it has a context for it.
            tls_context=self.tls_context if starttls else None,
            # Mail is taken without TLS too: the client must insist on it.
            require_starttls=False,
            authenticator=self._authenticate if self.credentials else None,
            auth_required=self.credentials is not None,
            auth_exclude_mechanism=[
                m for m in ("LOGIN", "PLAIN") if m not in (self.auth_mechanisms or (m,))
            ],
        )
        # AUTH without TLS as well. Set after construction: passing it warns on every
        # connection that this is unsafe, which here is the point.
        protocol._auth_require_tls = False
        self._protocols.append(protocol)
        return protocol

    def start(self) -> SmtpServer:
        self._thread.start()
        self._listen()
        return self

    def _listen(self) -> None:
        ssl_arg = self.tls_context if self.mode == "smtps" else None

        async def serve() -> asyncio.AbstractServer:
            return await self._loop.create_server(
                self._protocol, "127.0.0.1", self.port, ssl=ssl_arg, reuse_address=True
            )

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def go_down(self) -> None:
        """Stop listening and drop every open connection: the relay is gone."""

        async def down() -> None:
            assert self._server is not None
            self._server.close()
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.abort()
            self._protocols.clear()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)

    def freeze_connections(self) -> None:
        """Stop answering on open connections without closing them, like a NAT or
        firewall that silently dropped them; new connections still work."""

        async def freeze() -> None:
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.pause_reading()

        asyncio.run_coroutine_threadsafe(freeze(), self._loop).result(10)

    def come_back(self) -> None:
        """Listen again on the same port."""
        self._listen()

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            # Do not wait for clients: a worker may hold pooled connections open.
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
