"""Render stage: an event and its filter decision become the bytes of one mail (docs/design.md,
"The mail").

The Message-ID is derived from the event id, so every copy of a mail (after a crash or a
replay) carries the same one and mail clients can collapse duplicates.
"""

from __future__ import annotations

import html
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from fnmatch import fnmatchcase
from typing import Final

from shared.config import MailConfig, Route
from shared.event import Event
from shared.filter import Decision
from shared.levels import Level, level_rank
from shared.placeholders import render_template
from worker.mime import body_part, header_value, one_line

__all__ = ["Mail", "Renderer"]

log = logging.getLogger(__name__)

MAX_SUBJECT_CHARS: Final = 200
FALLBACK_CHARSET: Final = "utf-8"


@dataclass(frozen=True, slots=True)
class Mail:
    event_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    charset: str


def _values(event: Event, level: str) -> dict[str, str]:
    # Event fields fill in placeholders a param does not; params win on a clash, because a
    # catalog text written for a source means that source's value.
    values = {
        "node": event.node,
        "cluster": event.cluster,
        "module": event.module,
        "event_id": str(event.event_id),
        "level": level,
    }
    values.update(event.params)
    return values


def _subject_values(event: Event, level: str, message: str) -> dict[str, str]:
    """For the subject the event's own fields win over params of the same name: a
    ``level`` param must not make an error mail's subject say info."""
    return {
        **event.params,
        "node": event.node,
        "cluster": event.cluster,
        "module": event.module,
        "event_id": str(event.event_id),
        "level": level,
        "message": message,
    }


def _message(event: Event, decision: Decision, values: dict[str, str]) -> str:
    if decision.entry is not None:
        return render_template(decision.entry.text, values)
    if event.text:
        return event.text
    return f"Event {event.key} (not in the catalog)"


def _body(event: Event, decision: Decision, message: str, values: dict[str, str]) -> str:
    lines = [message, ""]
    entry = decision.entry
    if entry is not None and entry.action:
        lines += ["Suggested action:", render_template(entry.action, values), ""]
    if entry is not None and event.text:
        lines += ["Details:", event.text, ""]
    lines += [
        f"Cluster:    {event.cluster}",
        f"Node:       {event.node}",
        f"Module:     {event.module}",
        f"Event ID:   {event.event_id}",
        f"Level:      {decision.level}",
        f"Event time: {event.time.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC",
    ]
    if event.params:
        lines.append("Parameters:")
        lines += [f"  {key}: {value}" for key, value in sorted(event.params.items())]
    lines += ["", f"Event: {event.id}", "-- ", "Sent by clusteralert."]
    return "\n".join(lines)


def _fits(charset: str, *texts: str) -> bool:
    try:
        for text in texts:
            text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


def _html(event: Event, decision: Decision, message: str, values: dict[str, str]) -> str:
    """The HTML alternative. Every value comes from the event or the catalog and is
    escaped; nothing from an event can become markup."""
    esc = html.escape
    rows = [
        ("Cluster", event.cluster),
        ("Node", event.node),
        ("Module", event.module),
        ("Event ID", str(event.event_id)),
        ("Level", decision.level),
        ("Event time", f"{event.time.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC"),
        *((f"Param {key}", value) for key, value in sorted(event.params.items())),
        ("Event", event.id),
    ]
    parts = ["<!DOCTYPE html>", "<html><body>", f"<p><strong>{esc(message)}</strong></p>"]
    entry = decision.entry
    if entry is not None and entry.action:
        action = render_template(entry.action, values)
        parts.append(f"<p>Suggested action: {esc(action)}</p>")
    if entry is not None and event.text:
        parts.append(f"<p>Details: {esc(event.text)}</p>")
    parts.append("<table>")
    parts += [f'<tr><th align="left">{esc(k)}</th><td>{esc(v)}</td></tr>' for k, v in rows]
    parts += ["</table>", "</body></html>"]
    return "\n".join(parts)


def _route(routes: Sequence[Route], key: str, level: Level) -> Route | None:
    for route in routes:
        if level_rank(level) < level_rank(route.min_level):
            continue
        if not route.match or any(fnmatchcase(key, p) for p in route.match):
            return route
    return None


class Renderer:
    def __init__(self, config: MailConfig, routes: Sequence[Route] = ()):
        self.config = config
        self.routes = tuple(routes)

    def recipients(self, event: Event, level: Level) -> tuple[str, ...]:
        """The first matching ``[[route]]``'s recipients, else ``[mail] to``. Never
        anything from the event itself."""
        route = _route(self.routes, event.key, level)
        return route.to if route is not None else self.config.to

    def render(self, event: Event, decision: Decision) -> Mail:
        values = _values(event, decision.level)
        message = _message(event, decision, values)
        subject = one_line(
            render_template(self.config.subject, _subject_values(event, decision.level, message))
        )
        if len(subject) > MAX_SUBJECT_CHARS:
            # An ellipsis the charset cannot encode would force the whole mail to utf-8.
            ellipsis = "\u2026" if _fits(self.config.charset, "\u2026") else "..."
            subject = subject[: MAX_SUBJECT_CHARS - len(ellipsis)] + ellipsis
        body = _body(event, decision, message, values)
        html_body = _html(event, decision, message, values) if self.config.html else ""

        charset = self.config.charset
        header_fields = (event.module, event.node, event.cluster)
        if not _fits(charset, subject, body, html_body, *header_fields):
            log.info(
                "event %s: text cannot be encoded in %s; sending this mail as %s",
                event.id,
                charset,
                FALLBACK_CHARSET,
            )
            charset = FALLBACK_CHARSET

        recipients = self.recipients(event, decision.level)
        if self.config.subject_encode:
            subject_bytes = header_value(subject, charset).encode("ascii")
        else:
            # Legacy receivers: the subject raw in the charset (still one line).
            subject_bytes = subject.encode(charset)
        headers = [
            ("From", self.config.sender),
            # One address per line: a long list must not exceed the 998-byte line limit.
            ("To", ",\r\n ".join(recipients)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("Message-ID", f"<{event.id}@{self.config.domain}>"),
            ("MIME-Version", "1.0"),
            ("Auto-Submitted", "auto-generated"),
            ("X-Clusteralert-Module", event.module),
            ("X-Clusteralert-Event", str(event.event_id)),
            ("X-Clusteralert-Level", decision.level),
            ("X-Clusteralert-Node", header_value(event.node, charset)),
            ("X-Clusteralert-Cluster", header_value(event.cluster, charset)),
        ]
        head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("ascii")
        head += b"Subject: " + subject_bytes + b"\r\n"
        return Mail(
            event_id=event.id,
            sender=self.config.sender,
            recipients=recipients,
            data=head + _content(body, html_body, charset, event.id),
            charset=charset,
        )


def _part(text: str, subtype: str, charset: str) -> bytes:
    encoding, payload = body_part(text, charset)
    return (
        f'Content-Type: text/{subtype}; charset="{charset}"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii") + payload


def _content(body: str, html_body: str, charset: str, event_id: str) -> bytes:
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
