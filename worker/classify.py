"""Map what aiosmtplib and ssl raise to our three failure classes, per SMTP step.

Each step of a transaction has its own function, because the same exception means
different things at different steps: an SSL error while connecting to an SMTPS port is a
TLS refusal, a disconnect in the middle of DATA is transient.
"""

from __future__ import annotations

import ssl

import aiosmtplib

from shared.errors import (
    DeliveryError,
    PermanentError,
    TlsRefusedError,
    TransientError,
    describe,
)

__all__ = [
    "classify_auth",
    "classify_connect",
    "classify_response",
    "classify_starttls",
    "classify_transaction",
    "combine_attempts",
]


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


def classify_response(code: int, message: str) -> DeliveryError:
    """A reply code: 4xx is worth retrying, anything else is final."""
    detail = f"{code} {message}".replace("\r", " ").replace("\n", " ")[:300]
    if 400 <= code < 500:
        return TransientError("rejected_4xx", detail)
    return PermanentError("rejected_5xx", detail)


def _classify_network(exc: BaseException) -> DeliveryError:
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return TransientError("timeout", describe(exc))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return classify_response(exc.code, exc.message)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return TransientError("disconnected", describe(exc))
    return TransientError("connect", describe(exc))


def classify_connect(exc: BaseException) -> DeliveryError:
    """Opening the connection, including the TLS handshake of SMTPS, and the greeting."""
    tls_error = _ssl_cause(exc)
    if tls_error is not None:
        return _tls_refusal(tls_error)
    return _classify_network(exc)


def classify_starttls(exc: BaseException) -> DeliveryError:
    """The STARTTLS command and the handshake after it."""
    tls_error = _ssl_cause(exc)
    if tls_error is not None:
        return _tls_refusal(tls_error)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TlsRefusedError("rejected", f"{exc.code} {exc.message}"[:300])
    return _classify_network(exc)


def classify_auth(exc: BaseException) -> DeliveryError:
    """AUTH: a 5xx (535 bad credentials) is permanent; the text never holds the password."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError | aiosmtplib.SMTPResponseException):
        if 400 <= exc.code < 500:
            return TransientError("rejected_4xx", f"AUTH {exc.code} {exc.message}"[:300])
        return PermanentError("auth", f"AUTH {exc.code} {exc.message}"[:300])
    if isinstance(exc, aiosmtplib.SMTPException) and not isinstance(
        exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError
    ):
        # e.g. "No suitable authentication method found": no retry will change that.
        return PermanentError("auth", describe(exc))
    return _classify_network(exc)


def classify_transaction(exc: BaseException) -> DeliveryError:
    """MAIL, RCPT and DATA."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        # Any 4xx: a later attempt may reach those recipients, so it is worth retrying.
        if any(400 <= c < 500 for c in codes):
            return TransientError("rejected_4xx", f"all recipients refused: {detail}"[:300])
        return PermanentError("rejected_5xx", f"all recipients refused: {detail}"[:300])
    if isinstance(exc, aiosmtplib.SMTPNotSupported | ValueError):
        return PermanentError("rejected_5xx", describe(exc))
    return _classify_network(exc)


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
