"""Keep secrets out of text that leaves the process (DLQ headers, logs, error texts).

A relay's reply is not ours to trust: one that echoes what it was sent may repeat the
password as given, or in the base64 form AUTH LOGIN (the password alone) and AUTH PLAIN
(``\\0user\\0password``) sent it in. Both are masked, and so is the percent-encoded form a
broker URL carries.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import quote

from shared.secret import Secret

__all__ = ["MASK", "LogScrubber", "Scrubber", "scrub_logs"]

MASK: Final = "********"
# A run of base64 characters long enough to hold a secret of at least one byte.
_BASE64_RUN: Final = re.compile(r"[A-Za-z0-9+/]{4,}={0,2}")


def _decode(chars: str) -> bytes:
    """``chars`` as base64 with the padding restored; b"" when it is not base64."""
    if len(chars) % 4 == 1:  # no encoding ends like that: the last character is extra
        chars = chars[:-1]
    try:
        return base64.b64decode(chars + "=" * (-len(chars) % 4))
    except (binascii.Error, ValueError):
        return b""


class Scrubber:
    """Replaces every configured secret in a text, in any of the forms above."""

    def __init__(self, secrets: Iterable[Secret | None]):
        values = {s.reveal() for s in secrets if s is not None and s.reveal()}
        forms = values | {quote(v, safe="") for v in values}
        # Longest first, so a secret containing another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)
        self._raw = [v.encode() for v in values]

    def __call__(self, text: str) -> str:
        if not self._raw:
            return text
        for form in self._forms:
            text = text.replace(form, MASK)
        return _BASE64_RUN.sub(self._mask_encoded, text)

    def _mask_encoded(self, match: re.Match[str]) -> str:
        run = match.group()
        chars = run.rstrip("=")
        # The run may start with a few characters glued to the encoding (``pw=AGFs...``
        # is one run): try each alignment a base64 group can have.
        for skip in range(min(4, len(chars))):
            decoded = _decode(chars[skip:])
            if any(raw in decoded for raw in self._raw):
                return run[:skip] + MASK
        return run


class LogScrubber(logging.Filter):
    """Masks secrets in every record a handler emits: the message with its arguments,
    and any traceback or stack, whatever logger and exception they come from."""

    def __init__(self, scrub: Callable[[str], str]):
        super().__init__()
        self._scrub = scrub
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self._scrub(self._formatter.formatException(record.exc_info))
            # Formatters would render the exception again from exc_info, unmasked.
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._scrub(record.stack_info)
        return True


def scrub_logs(scrub: Callable[[str], str]) -> None:
    """Mask secrets in everything the root logger's handlers write."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogScrubber(scrub))
