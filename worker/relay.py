"""One SMTP relay: a small pool of reused connections, and the TLS policy.

Connections are opened lazily up to ``max_connections`` and kept for the next mail, since
a TCP and TLS handshake per mail costs more than the mail itself. A relay may close an
idle connection at any time; a reused connection that turns out dead is replaced once,
without counting as a failure.

TLS is never opportunistic: aiosmtplib's default (``start_tls=None``) upgrades only when
the server offers STARTTLS and otherwise sends in plaintext. We connect with
``start_tls=False`` and upgrade ourselves, refusing to continue when STARTTLS is not
offered.

Every text from the relay is masked with the relay's own password before it is kept or
logged: a relay may echo what it was sent (see :mod:`worker.scrub`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib

from shared.config import SmtpRelay
from shared.errors import ConnectionDropped, DeliveryError, TlsRefusedError
from shared.tls import client_context
from worker import pipelining
from worker.classify import (
    classify_auth,
    classify_connect,
    classify_starttls,
    classify_transaction,
    relay_text,
)
from worker.render import Mail
from worker.scrub import Scrubber

__all__ = ["Refusal", "Relay", "StepHook", "quit_client"]

# Called with the stage a new connection reached ("connect", "tls", "auth") and the client.
StepHook = Callable[[str, aiosmtplib.SMTP], None]

log = logging.getLogger(__name__)

PROBE_AFTER = 20.0  # seconds idle before a pooled connection is checked with NOOP
PROBE_TIMEOUT = 5.0
MAX_IDLE = 240.0  # relays commonly drop idle sessions after about 5 minutes


@dataclass(frozen=True, slots=True)
class Refusal:
    """A recipient the relay refused while it accepted the mail for others."""

    code: int
    text: str  # the reply as one line, secrets masked

    @property
    def temporary(self) -> bool:
        """4xx, e.g. greylisting: a later attempt may reach this recipient."""
        return 400 <= self.code < 500


class _Reconnect(Exception):
    """A pooled connection was found gone: the mail is tried once on a new one."""

    def __init__(self, dropped: ConnectionDropped):
        super().__init__(dropped.detail)
        self.dropped = dropped


class Relay:
    def __init__(self, config: SmtpRelay, *, on_certificate: Callable[[float], None] | None = None):
        """``on_certificate`` is told the relay certificate's notAfter (Unix time) at
        every TLS handshake, so an expiry is seen weeks before it stops the mail."""
        self.config = config
        self._on_certificate = on_certificate
        self.label = config.label
        self.scrub = Scrubber([config.password])
        self._tls: ssl.SSLContext | None = (
            None if config.security == "none" else client_context(config.ca_file)
        )
        # Idle connections with the time they were last used, most recent last.
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots: asyncio.Semaphore | None = None
        self._failures = 0
        self._cooldown_until = 0.0
        self._next_slot = 0.0

    async def _pace(self) -> None:
        """Space mails ``1 / rate_limit`` seconds apart: each caller reserves the next
        free slot in time, then sleeps until it comes."""
        interval = 1.0 / self.config.rate_limit
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def cooling_down(self, now: float) -> bool:
        return now < self._cooldown_until

    def note_failure(self, now: float, threshold: int = 3) -> bool:
        """Count a failure; True when this one starts a cool-down."""
        self._failures += 1
        if self._failures >= threshold and self.config.cooldown > 0:
            self._failures = 0
            self._cooldown_until = now + self.config.cooldown
            return True
        return False

    def note_success(self) -> None:
        self._failures = 0
        self._cooldown_until = 0.0

    async def send(self, mail: Mail) -> dict[str, Refusal]:
        """Deliver ``mail``; returns the recipients the relay refused while accepting the
        mail for others. Raises a :class:`DeliveryError` subclass otherwise."""
        if self.config.sender:
            # This relay's provider accepts only its approved sender.
            mail = mail.with_sender(self.config.sender)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_connections)
        if self.config.rate_limit > 0:
            await self._pace()
        try:
            return await self._attempt(mail, reuse=True)
        except _Reconnect as exc:
            # The relay closed a connection we held idle, or one an earlier mail on it
            # failed or gave up on: not a failure yet.
            log.debug(
                "relay %s dropped a reused connection (%s); reconnecting",
                self.label,
                exc.dropped.detail,  # masked by classify
            )
        return await self._attempt(mail, reuse=False)

    async def _attempt(self, mail: Mail, *, reuse: bool) -> dict[str, Refusal]:
        """One try on one connection, a pooled one if ``reuse`` and there is one.
        Raises :class:`_Reconnect` when a pooled connection turns out gone.

        With PIPELINING the connection goes back to the pool, and its slot is freed,
        as soon as the body is written: the next mail's envelope follows the body on
        the wire while this mail waits for the body's reply (RFC 2920 3.1)."""
        assert self._slots is not None
        async with self._slots:
            client = await self._take_idle() if reuse else None
            reused = client is not None
            if client is None:
                client = await self._open()
            try:
                pending = await self._begin(client, mail)
            except ConnectionDropped as exc:
                if reused:
                    raise _Reconnect(exc) from None
                raise
            self._idle.append((client, time.monotonic()))
        try:
            refused = await pending.result()
        except BaseException as exc:
            if not client.is_connected:
                # Closed by the result: it must not wait in the pool.
                self._idle = [(c, used) for c, used in self._idle if c is not client]
            if not isinstance(exc, Exception):
                raise
            error = classify_transaction(exc, self.scrub)
            if reused and isinstance(error, ConnectionDropped):
                raise _Reconnect(error) from None
            raise error from None
        return {
            rcpt: Refusal(resp.code, relay_text(f"{resp.code} {resp.message}", self.scrub))
            for rcpt, resp in refused.items()
        }

    async def _take_idle(self) -> aiosmtplib.SMTP | None:
        """A pooled connection that is still alive, or None. One idle for a while is
        probed with NOOP under a short timeout first: a NAT or firewall may have dropped
        it silently, and a mail sent into a dead connection would wait out the full
        timeout. Connections idle longer than relays keep them are just closed."""
        now = time.monotonic()
        while self._idle:
            client, last_used = self._idle.pop()
            if not client.is_connected:
                pipelining.close(client)
                continue
            if pipelining.owed(client):
                # Not idle: a mail before this one waits for its body's reply, within its
                # own timeout (its body went out at last_used). A probe would have to wait
                # for that reply, and closing here would lose it: the relay may well have
                # taken that mail, which would then be sent again.
                return client
            idle_for = now - last_used
            if idle_for > MAX_IDLE:
                pipelining.close(client)
                continue
            if idle_for > PROBE_AFTER:
                probe_timeout = min(PROBE_TIMEOUT, self.config.timeout)
                try:
                    # NOOP's reply would be read as a pipelined mail's one still owed.
                    # (Not wait_for, which on 3.11 can drop a cancel: see pipelining.)
                    async with asyncio.timeout(probe_timeout):
                        await pipelining.settled(client)
                    await client.noop(timeout=probe_timeout)
                except Exception as exc:
                    log.debug(
                        "relay %s: idle connection failed NOOP (%s)",
                        self.label,
                        relay_text(str(exc) or type(exc).__name__, self.scrub),
                    )
                    pipelining.close(client)
                    continue
                except BaseException:
                    # Cancelled while out of the pool, maybe amid the probe: never pooled
                    # again (nothing is owed on it: see above).
                    pipelining.close(client)
                    raise
            return client
        return None

    async def _open(self, step: StepHook | None = None) -> aiosmtplib.SMTP:
        """A connected, TLS-protected (unless ``security = "none"``) and logged-in client.
        ``step`` is told of each stage reached, for ``test-mail`` to show them."""
        cfg = self.config
        smtps = cfg.security == "smtps"
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            use_tls=smtps,
            start_tls=False,
            tls_context=self._tls if smtps else None,
            local_hostname=cfg.helo,
        )
        try:
            try:
                await client.connect()
            except Exception as exc:
                raise classify_connect(exc, self.scrub) from None
            if step:
                step("connect", client)
            if cfg.security == "starttls":
                await self._starttls(client)
            if cfg.security != "none":
                self._saw_certificate(client)
                if step:
                    step("tls", client)
            if cfg.username is not None and cfg.password is not None:
                try:
                    await client.login(cfg.username, cfg.password.reveal())
                except Exception as exc:
                    raise classify_auth(exc, self.scrub) from None
                if step:
                    step("auth", client)
        except BaseException:
            client.close()
            raise
        return client

    def _saw_certificate(self, client: aiosmtplib.SMTP) -> None:
        # The context verifies the chain, so the peer certificate is always there once
        # the handshake succeeded; getpeercert() decodes it only when verified.
        peer = client.get_transport_info("peercert")
        if self._on_certificate is not None and isinstance(peer, dict) and "notAfter" in peer:
            self._on_certificate(float(ssl.cert_time_to_seconds(peer["notAfter"])))

    async def _starttls(self, client: aiosmtplib.SMTP) -> None:
        assert self._tls is not None
        try:
            await client.ehlo()
        except Exception as exc:
            raise classify_connect(exc, self.scrub) from None
        # aiosmtplib raises a bare SMTPException when STARTTLS is missing; decide from the
        # EHLO extensions instead of matching its message.
        if not client.supports_extension("starttls"):
            raise TlsRefusedError("not_offered", f"{self.label} does not offer STARTTLS")
        try:
            await client.starttls(tls_context=self._tls)
        except Exception as exc:
            raise classify_starttls(exc, self.scrub) from None

    async def _begin(self, client: aiosmtplib.SMTP, mail: Mail) -> pipelining.Pending:
        """The transaction up to the body's reply. Any failure closes the connection,
        but only once a reply still owed on it to an earlier mail is in: that mail's
        body is on the wire, and losing its reply would have it sent twice."""
        try:
            return await pipelining.begin(client, mail.sender, mail.recipients, mail.data)
        except Exception as exc:
            pipelining.close_after_owed(client)
            error: DeliveryError = classify_transaction(exc, self.scrub)
            raise error from None
        except BaseException:
            # Cancelled (the worker's max_hold, a shutdown) in the middle of a transaction:
            # the session is in an unknown state, so it is closed, never pooled or left open.
            pipelining.close_after_owed(client)
            raise

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(quit_client(client) for client, _ in idle))


async def quit_client(client: aiosmtplib.SMTP) -> None:
    """Say QUIT politely, once the replies owed to pipelined mails are in (QUIT's reply
    would be read as theirs), but never wait long for it."""
    try:
        await asyncio.wait_for(_quit(client), timeout=2)
    except Exception:
        pipelining.close(client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    await pipelining.settled(client)
    await client.quit()
