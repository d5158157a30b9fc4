"""Map what aiosmtplib and ssl raise to our three failure classes, per SMTP step.

Each step of a transaction has its own function, because the same exception means
different things at different steps: an SSL error while connecting to an SMTPS port is a
TLS refusal, a disconnect in the middle of DATA is transient.

Every text that may come from the relay passes through ``scrub`` before it is cut to
length and kept in an error: a relay may echo the password, and a cut made first could
leave a part of it that no longer matches.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import aiosmtplib

from shared.errors import (
    ConnectionDropped,
    DeliveryError,
    PermanentError,
    TlsRefusedError,
    TransientError,
)

__all__ = [
    "Scrub",
    "classify_auth",
    "classify_connect",
    "classify_response",
    "classify_starttls",
    "classify_transaction",
    "combine_attempts",
    "relay_text",
]

Scrub = Callable[[str], str]


def _same(text: str) -> str:
    return text


def relay_text(text: str, scrub: Scrub = _same, limit: int = 300) -> str:
    """Text from or about the relay as one line for logs and headers: secrets masked
    first, then cut."""
    return scrub(text).replace("\r", " ").replace("\n", " ")[:limit]


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """aiosmtplib wraps the SSL error of an SMTPS connect in SMTPConnectError."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_refusal(error: ssl.SSLError) -> TlsRefusedError:
    if isinstance(error, ssl.SSLCertVerificationError):
        return TlsRefusedError("verify", error.verify_message or "certificate not trusted")
    return TlsRefusedError("handshake", error.reason or type(error).__name__)


def classify_response(code: int, message: str, scrub: Scrub = _same) -> DeliveryError:
    """A reply code: 4xx is worth retrying, anything else is final."""
    detail = relay_text(f"{code} {message}", scrub)
    if 400 <= code < 500:
        return TransientError("rejected_4xx", detail)
    return PermanentError("rejected_5xx", detail)


def _describe(exc: BaseException, scrub: Scrub) -> str:
    return relay_text(str(exc) or type(exc).__name__, scrub)


def _classify_network(
    exc: BaseException, scrub: Scrub, lost: type[TransientError] = TransientError
) -> DeliveryError:
    """``lost`` is the class of a connection that went away (disconnected or reset)."""
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientError("timeout", _describe(exc, scrub))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return classify_response(exc.code, exc.message, scrub)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return lost("disconnected", _describe(exc, scrub))
    return lost("connect", _describe(exc, scrub))


def classify_connect(exc: BaseException, scrub: Scrub = _same) -> DeliveryError:
    """Opening the connection, including the TLS handshake of SMTPS, and the greeting."""
    tls_error = _ssl_cause(exc)
    if tls_error is not None:
        return _tls_refusal(tls_error)
    return _classify_network(exc, scrub)


def classify_starttls(exc: BaseException, scrub: Scrub = _same) -> DeliveryError:
    """The STARTTLS command and the handshake after it."""
    tls_error = _ssl_cause(exc)
    if tls_error is not None:
        return _tls_refusal(tls_error)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TlsRefusedError("rejected", relay_text(f"{exc.code} {exc.message}", scrub))
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected) and isinstance(
        exc.__cause__, ConnectionError
    ):
        # The relay said yes to STARTTLS, then dropped the connection in the middle of our
        # handshake: what a server that cannot speak TLS 1.2 or later does instead of an
        # alert. Retrying for an hour would not change its TLS versions.
        return TlsRefusedError(
            "handshake", "the relay dropped the connection during the TLS handshake"
        )
    return _classify_network(exc, scrub)


def classify_auth(exc: BaseException, scrub: Scrub = _same) -> DeliveryError:
    """AUTH: a 5xx (535 bad credentials) is permanent. A relay may echo the credentials
    in its reply, so ``scrub`` must know the password."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPResponseException):
        detail = relay_text(f"AUTH {exc.code} {exc.message}", scrub)
        if 400 <= exc.code < 500:
            return TransientError("rejected_4xx", detail)
        return PermanentError("auth", detail)
    if isinstance(exc, aiosmtplib.SMTPException) and not isinstance(
        exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError
    ):
        # e.g. "No suitable authentication method found": no retry will change that.
        return PermanentError("auth", _describe(exc, scrub))
    return _classify_network(exc, scrub)


def classify_transaction(exc: BaseException, scrub: Scrub = _same) -> DeliveryError:
    """MAIL, RCPT and DATA. A connection that went away is :class:`ConnectionDropped`,
    which on a pooled connection may only mean the relay closed it while idle."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        detail = relay_text(f"all recipients refused: {detail}", scrub)
        # Any 4xx: a later attempt may reach those recipients, so it is worth retrying.
        refused: DeliveryError = (
            TransientError("rejected_4xx", detail)
            if any(400 <= c < 500 for c in codes)
            else PermanentError("rejected_5xx", detail)
        )
        refused.about_relay = False
        return refused
    if isinstance(exc, aiosmtplib.SMTPNotSupported | ValueError):
        return PermanentError("rejected_5xx", _describe(exc, scrub))
    error = _classify_network(exc, scrub, ConnectionDropped)
    if isinstance(exc, aiosmtplib.SMTPDataError) and exc.code >= 500:
        # The content refused (policy, size, spam). A 4xx to DATA or to the body is the
        # relay's own trouble for now (a full queue, say), and counts against it.
        error.about_relay = False
    return error


def combine_attempts(errors: list[DeliveryError]) -> DeliveryError:
    """One attempt tried every relay; classify it only now: transient if any
    relay failed transiently, TLS refused if every relay refused TLS, else permanent."""
    if not errors:
        raise ValueError("no relay was tried")
    for error in errors:
        if isinstance(error, TransientError):
            return error
    if all(isinstance(error, TlsRefusedError) for error in errors):
        return errors[0]
    return next(e for e in errors if not isinstance(e, TlsRefusedError))
