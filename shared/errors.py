"""Error classes shared by producer and worker.

A message the worker could not finish fails with a :class:`MessageFailure`, and its class
alone decides what happens next. Delivery failures are classified where they happen (the
SMTP step, the reply code, the exception type): transient ones are retried, TLS refusals
and permanent ones are dead-lettered. An event that cannot become a mail
(:class:`UnusableEvent`) and a bug of the worker (:class:`WorkerCrash`) are dead-lettered
too. Every failure carries a ``reason`` from the fixed set below, which becomes a metric
label, so it must never hold free text.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = [
    "FAILURE_REASONS",
    "TLS_CAUSES",
    "ClusteralertError",
    "ConfigError",
    "ConnectionDropped",
    "DeliveryError",
    "InvalidEvent",
    "MessageFailure",
    "PermanentError",
    "Problem",
    "SpoolError",
    "TlsRefusedError",
    "TransientError",
    "UnusableEvent",
    "WorkerCrash",
    "describe",
]

Reason = Literal[
    "connect",
    "timeout",
    "disconnected",
    "rejected_4xx",
    "rejected_5xx",
    "auth",
    "tls_refused",
    "invalid_event",
    "render",
    "crash",
]
TlsCause = Literal["not_offered", "rejected", "handshake", "verify"]

FAILURE_REASONS: Final[tuple[Reason, ...]] = get_args(Reason)
TLS_CAUSES: Final[tuple[TlsCause, ...]] = get_args(TlsCause)


def describe(exc: BaseException) -> str:
    """An exception as one short line for logs and error headers."""
    text = str(exc) or type(exc).__name__
    return text.replace("\r", " ").replace("\n", " ")[:300]


class ClusteralertError(Exception):
    """Base of every error this project raises on purpose."""


class Problem:
    """One finding about config or catalog: where it is, what is wrong, and how bad."""

    __slots__ = ("message", "path", "severity")

    def __init__(self, path: str, message: str, severity: Literal["error", "warning"] = "error"):
        self.path = path
        self.message = message
        self.severity = severity

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{prefix}{self.path}: {self.message}" if self.path else f"{prefix}{self.message}"

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Problem) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


class ConfigError(ClusteralertError):
    """Config or catalog could not be used. ``problems`` lists every error found, not just
    the first, so that one ``check-config`` run shows everything to fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        first = str(problems[0]) if problems else "invalid configuration"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)


class InvalidEvent(ClusteralertError):
    """An event that is structurally unusable (not JSON, missing or wrongly typed field,
    too large). Dirty but well-formed content is cleaned instead of refused."""


class SpoolError(ClusteralertError):
    """The producer could not make an event durable (disk full, permissions)."""


class MessageFailure(ClusteralertError):
    """Why the worker could not finish one message. Subclasses decide what happens next."""

    def __init__(self, reason: Reason, detail: str):
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class UnusableEvent(MessageFailure):
    """The event cannot become a mail (undecodable, or the renderer failed on it):
    no retry can change that, so it is dead-lettered at once."""


class WorkerCrash(MessageFailure):
    """An unexpected exception while handling the message: a bug of ours. Dead-lettered
    at once with reason ``crash``, so the message waits for someone to look at it."""

    def __init__(self, detail: str):
        super().__init__("crash", detail)


class DeliveryError(MessageFailure):
    """A failed attempt to hand a mail to a relay."""

    # False when the relay answered and refused only this mail (its recipients, or its
    # content with a 5xx): the relay itself is fine, so the failure must not count
    # towards its cool-down, or one bad address would take a healthy relay out of use.
    about_relay: bool = True


class TransientError(DeliveryError):
    """Worth retrying: refused or reset connections, timeouts, 4xx replies, disconnects."""


class ConnectionDropped(TransientError):
    """The relay's connection went away mid-transaction (reset, closed). On a pooled
    connection the relay may just have closed it while idle: the sender reconnects once
    before calling it a failure."""


class PermanentError(DeliveryError):
    """Retrying cannot help: 5xx replies, authentication failures."""


class TlsRefusedError(DeliveryError):
    """The relay could not give us a verified TLS session. Never retried in plaintext."""

    def __init__(self, cause: TlsCause, detail: str):
        self.cause: TlsCause = cause
        super().__init__("tls_refused", f"{cause}: {detail}")
