"""Keep secrets out of text that leaves the process (DLQ headers, logs)."""

from __future__ import annotations

from collections.abc import Iterable

from shared.secret import Secret

__all__ = ["Scrubber"]

MASK = "********"


class Scrubber:
    """Replaces every configured secret in a text. Client libraries do not normally echo
    passwords, but an error text from a relay or broker is not ours to trust."""

    def __init__(self, secrets: Iterable[Secret | None]):
        # Longest first, so a secret containing another is masked whole.
        values = {s.reveal() for s in secrets if s is not None and s.reveal()}
        self._values = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return text
