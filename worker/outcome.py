"""What happens to one broker message once the pipeline is done with it. A module of its
own so that the broker side (settling, the DLQ commands) can name outcomes without
loading the SMTP side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to do with the broker message: ``ack`` after a relay accepted the mail or the
    event was filtered out; ``retry`` on the ladder rung ``rung``; ``dead_letter`` when
    delivery is given up. ``headers`` are the message's headers for its next queue."""

    action: Literal["ack", "retry", "dead_letter"]
    reason: str | None = None
    rung: str | None = None
    headers: Mapping[str, object] | None = None
