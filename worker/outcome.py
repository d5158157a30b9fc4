"""What happens to one broker message once the pipeline is done with it: one of three
types, so that code acting on an outcome matches on its type (mypy checks that every
case is handled) instead of asserting on optional fields. A module of its own so that
the broker side (settling, the DLQ commands) can name outcomes without loading the SMTP
side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

__all__ = ["Acked", "DeadLetter", "Outcome", "Retry"]


@dataclass(frozen=True, slots=True)
class Acked:
    """Done with the message: a relay accepted the mail, or the event was filtered out."""

    action: ClassVar[str] = "ack"  # how logs name the outcome


@dataclass(frozen=True, slots=True)
class Retry:
    """Publish the message to the ladder rung ``rung`` (a routing key on the retry
    exchange, e.g. ``"30s"``) after a transient failure of kind ``reason``, with
    ``headers`` as its headers there."""

    rung: str
    reason: str
    headers: Mapping[str, object]
    action: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give delivery up: publish the message to the DLQ with ``headers``, counted under
    ``reason``."""

    reason: str
    headers: Mapping[str, object]
    action: ClassVar[str] = "dead_letter"


Outcome: TypeAlias = Acked | Retry | DeadLetter
