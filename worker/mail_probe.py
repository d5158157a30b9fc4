"""``clusteralert-worker test-mail`` and ``check-config --probe``: talk to each relay
directly, the way the worker does, and print every step, so an operator can check the mail
path without waiting for a failure.

The connection is opened by :class:`worker.relay.Relay` itself, so the TLS policy shown is
exactly the one the worker applies (STARTTLS required, certificates and host names checked,
TLS 1.2 at least). Every line that carries relay text goes through the scrubber: a relay
that echoes the password never gets it printed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

import aiosmtplib

from shared.config import Config, SmtpRelay, config_secrets
from shared.errors import DeliveryError, describe
from worker.classify import classify_transaction
from worker.relay import Relay, quit_client
from worker.scrub import Scrubber

__all__ = ["probe_relays"]

Print = Callable[[str], None]


def _cert_line(ssl_object: ssl.SSLObject | None) -> str:
    if ssl_object is None:
        return "no certificate"
    cert = ssl_object.getpeercert() or {}

    def name(field: str) -> str:
        # A distinguished name is a tuple of RDNs, each a tuple of (key, value) pairs.
        pairs = [
            f"{pair[0]}={pair[1]}"
            for rdn in cert.get(field, ())
            if isinstance(rdn, tuple)
            for pair in rdn
            if isinstance(pair, tuple) and len(pair) == 2
        ]
        return ", ".join(pairs) or "?"

    expires = str(cert.get("notAfter", ""))
    left = ""
    if expires:
        when = datetime.fromtimestamp(ssl.cert_time_to_seconds(expires), UTC)
        left = f" ({(when - datetime.now(UTC)).days} days left)"
        expires = when.strftime("%Y-%m-%d %H:%M UTC")
    return f"subject {name('subject')}; issuer {name('issuer')}; expires {expires or '?'}{left}"


def _test_mail(sender: str, to: Sequence[str], relay: SmtpRelay) -> bytes:
    domain = sender.rpartition("@")[2] or "localhost"
    now = datetime.now(UTC)
    lines = [
        f"From: {sender}",
        f"To: {', '.join(to)}",
        f"Subject: clusteralert test mail through {relay.label}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <test-{uuid.uuid4()}@{domain}>",
        "Auto-Submitted: auto-generated",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "",
        f"This is a test mail from clusteralert on {socket.gethostname()}.",
        f"It went through relay {relay.label} ({relay.security}) at {now:%Y-%m-%d %H:%M:%S} UTC.",
        "If you read this, mail from the cluster will reach you through this relay.",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


class _Session:
    """One relay's probe: the steps reached, printed as they happen."""

    def __init__(self, relay: Relay, out: Print, scrub: Scrubber):
        self.relay = relay
        self.out = out
        self.scrub = scrub
        self.stage = "connect"

    def step(self, stage: str, detail: str) -> None:
        self.out(f"  {stage:<9} {self.scrub(detail)}")

    def on_open(self, stage: str, client: aiosmtplib.SMTP) -> None:
        cfg = self.relay.config
        if stage == "connect":
            self.step("connect", f"connected to {cfg.host}:{cfg.port}")
            self.stage = "tls" if cfg.security != "none" else "auth"
        elif stage == "tls":
            ssl_object = client.get_transport_info("ssl_object")
            version = ssl_object.version() if ssl_object else "?"
            cipher = ssl_object.cipher()[0] if ssl_object and ssl_object.cipher() else "?"
            self.step("tls", f"{version} {cipher} (certificate and host name verified)")
            self.step("cert", _cert_line(ssl_object))
            self.stage = "auth"
        elif stage == "auth":
            offered = " ".join(sorted(m.upper() for m in client.server_auth_methods))
            first = client.supported_auth_methods[:1]
            used = first[0].upper() if first else "?"
            self.step("auth", f"{used} as {cfg.username}: accepted (relay offers {offered})")
            self.stage = "mail"

    async def run(self, sender: str, to: Sequence[str], send: bool) -> bool:
        cfg = self.relay.config
        mode = "test mail" if send else "probe, nothing is sent"
        self.out(f"relay {cfg.label} ({cfg.security}; {mode})")
        if cfg.security == "none":
            self.step("warning", "security = none: this relay is used in plaintext")
        client: aiosmtplib.SMTP | None = None
        try:
            client = await self.relay._open(self.on_open)
            if cfg.username is None:
                self.step("auth", "no username configured; not authenticating")
            if send:
                await self._transact(client, sender, to)
        except DeliveryError as exc:
            self.step("FAILED", f"at {self.stage}: {exc}")
            return False
        except Exception as exc:  # a bug or an odd library error: still one line
            self.step("FAILED", f"at {self.stage}: {describe(exc)}")
            return False
        finally:
            if client is not None:
                await quit_client(client)
        self.step("ok", "mail accepted" if send else "relay is ready")
        return True

    async def _transact(self, client: aiosmtplib.SMTP, sender: str, to: Sequence[str]) -> None:
        cfg = self.relay.config
        data = _test_mail(sender, to, cfg)
        try:
            self.stage = "mail"
            reply = await client.mail(sender)
            self.step("mail", f"FROM:<{sender}>: {reply.code} {reply.message}")
            refused: list[aiosmtplib.SMTPRecipientRefused] = []
            self.stage = "rcpt"
            for address in to:
                try:
                    reply = await client.rcpt(address)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    refused.append(exc)
                    self.step("rcpt", f"TO:<{address}>: refused: {exc.code} {exc.message}")
                    continue
                self.step("rcpt", f"TO:<{address}>: {reply.code} {reply.message}")
            if len(refused) == len(to):
                raise classify_transaction(aiosmtplib.SMTPRecipientsRefused(refused))
            self.stage = "data"
            reply = await client.data(data)
            self.step("data", f"{len(data)} bytes: {reply.code} {reply.message}")
        except DeliveryError:
            raise
        except Exception as exc:
            raise classify_transaction(exc) from None


def probe_relays(
    config: Config,
    out: Print,
    *,
    send: bool,
    relay_index: int | None = None,
    to: Sequence[str] = (),
) -> bool:
    """Probe each relay (or only relay ``relay_index``, 1-based) in order; True if every
    one passed. With ``send``, a test mail goes through each to ``to`` (default: the
    configured recipients)."""
    relays = list(enumerate(config.smtp, start=1))
    if relay_index is not None:
        relays = [(i, r) for i, r in relays if i == relay_index]
    recipients = tuple(to) or config.mail.to
    scrub = Scrubber(config_secrets(config))

    async def run_all() -> bool:
        ok = True
        for _, relay_config in relays:
            session = _Session(Relay(relay_config), out, scrub)
            sender = relay_config.sender or config.mail.sender
            ok = await session.run(sender, recipients, send) and ok
        return ok

    return asyncio.run(run_all())
