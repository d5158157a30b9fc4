"""Keep secrets out of text that leaves the process (DLQ headers, logs, error texts).

A relay's reply is not ours to trust: one that echoes what it was sent may repeat the
password as given, or in the base64 form AUTH LOGIN (the password alone) and AUTH PLAIN
(``\\0user\\0password``) sent it in. Both are masked, and so is the percent-encoded form a
broker URL carries.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import quote

from shared.secret import Secret

__all__ = ["MASK", "LogScrubber", "Scrubber", "scrub_logs"]

MASK: Final = "********"
# A run of base64 characters; a run holding an encoded secret is masked whole.
_BASE64_RUN: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Shorter encoded cores would match ordinary words; such short secrets are masked only
# as they are.
_MIN_CORE: Final = 4


def _encoded_cores(secret: bytes) -> list[str]:
    """What the base64 encoding of any data containing ``secret`` must contain, for
    each of the three alignments the secret can have in it: the characters whose six
    bits all come from the secret. Searching for these is a plain substring search,
    cheap enough for every log line, where decoding every word would not be."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + secret).decode("ascii")
        start, end = -(-8 * offset // 6), 8 * (offset + len(secret)) // 6
        if end - start >= _MIN_CORE:
            cores.append(encoded[start:end])
    return cores


class Scrubber:
    """Replaces every configured secret in a text, in any of the forms above."""

    def __init__(self, secrets: Iterable[Secret | None]):
        values = {s.reveal() for s in secrets if s is not None and s.reveal()}
        forms = values | {quote(v, safe="") for v in values}
        # Longest first, so a secret containing another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)
        self._cores = [core for v in values for core in _encoded_cores(v.encode())]

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, MASK)
        if any(core in text for core in self._cores):
            text = _BASE64_RUN.sub(self._mask_encoded, text)
        return text

    def _mask_encoded(self, match: re.Match[str]) -> str:
        run = match.group()
        return MASK if any(core in run for core in self._cores) else run


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
