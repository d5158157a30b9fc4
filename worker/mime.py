"""Low-level MIME encoding for the mails we build.

The mail is assembled by hand rather than with ``email.message.EmailMessage``: the
modern email policy always writes encoded words as UTF-8 whatever charset is configured,
the legacy ``email.charset`` silently turns shift_jis and euc-jp into iso-2022-jp, and
the header registry costs milliseconds of CPU per mail. What we need is small: RFC 2047
encoded words in the configured charset, and a body transfer encoding any relay accepts.
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from typing import Final

__all__ = ["Mail", "body_part", "header_value", "mail_content", "one_line"]

_MAX_WORD: Final = 75  # RFC 2047: an encoded word is at most 75 characters
_PLAIN_HEADER_RE: Final = re.compile(r"[\x20-\x7e]*")
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_B64_LINE: Final = 76


@dataclass(frozen=True, slots=True)
class Mail:
    """A mail ready for SMTP: envelope and the message's bytes."""

    # The Message-ID's local part: the event's UUID (not its catalog number), or
    # ``digest-`` and a UUID for a storm digest. Logs name the mail by it.
    event_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    charset: str


def one_line(text: str) -> str:
    """Whatever reaches a header is one line: control characters become a space. Event
    fields are already cleaned by the codec; this also covers catalog texts."""
    return _CONTROL_RE.sub(" ", text).strip()


def _word(chunk: str, charset: str) -> str:
    payload = base64.b64encode(chunk.encode(charset)).decode("ascii")
    return f"=?{charset}?B?{payload}?="


def header_value(text: str, charset: str) -> str:
    """A header value: printable ASCII as it is, anything else as RFC 2047 B-encoded words
    in ``charset`` (which the caller checked can encode ``text``), folded with CRLF SP.

    Each word is encoded on its own; for stateful charsets such as iso-2022-jp, Python's
    codec ends every chunk back in ASCII, as RFC 1468 requires of each encoded word."""
    text = one_line(text)
    if _PLAIN_HEADER_RE.fullmatch(text) and "=?" not in text:
        return text
    words: list[str] = []
    chunk = ""
    for char in text:
        candidate = chunk + char
        if chunk and len(_word(candidate, charset)) > _MAX_WORD:
            words.append(_word(chunk, charset))
            chunk = char
        else:
            chunk = candidate
    if chunk:
        words.append(_word(chunk, charset))
    return "\r\n ".join(words)


def body_part(text: str, charset: str) -> tuple[str, bytes]:
    """The body in ``charset`` with CRLF line ends, and its transfer encoding: 7bit when
    the bytes are 7-bit clean with short lines (us-ascii, iso-2022-jp, plain English),
    else base64. 8bit would need 8BITMIME, which a relay may lack and mangle silently."""
    normalized = "\r\n".join(text.splitlines()) + "\r\n"
    data = normalized.encode(charset)
    if data.isascii() and all(len(line) <= 998 for line in data.split(b"\r\n")):
        return "7bit", data
    encoded = base64.b64encode(data)
    lines = [encoded[i : i + _B64_LINE] for i in range(0, len(encoded), _B64_LINE)]
    return "base64", b"\r\n".join(lines) + b"\r\n"


def _part(text: str, subtype: str, charset: str) -> bytes:
    encoding, payload = body_part(text, charset)
    return (
        f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii") + payload


def mail_content(body: str, html_body: str, charset: str) -> bytes:
    """The Content-* headers and the body: plain text, or plain text and HTML as
    multipart/alternative with a random boundary: event text cannot guess it."""
    if not html_body:
        return _part(body, "plain", charset)
    boundary = f"=_clusteralert_{uuid.uuid4().hex}"
    return (
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii")
        + f"--{boundary}\r\n".encode("ascii")
        + _part(body, "plain", charset)
        + f"--{boundary}\r\n".encode("ascii")
        + _part(html_body, "html", charset)
        + f"--{boundary}--\r\n".encode("ascii")
    )
