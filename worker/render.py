"""Render stage: an event and its filter decision become the bytes of one mail (docs/design.md,
"The mail").

The Message-ID is derived from the event id, so every copy of a mail (after a crash or a
replay) carries the same one and mail clients can collapse duplicates.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from fnmatch import fnmatchcase
from typing import Final

from shared.config import MailConfig, Route
from shared.event import Event
from shared.filter import Decision
from shared.levels import Level, level_rank
from shared.notification import DIGEST_PREFIX, Item, Notification
from shared.placeholders import render_template
from worker.mime import Mail, from_header, header_value, mail_content, one_line

__all__ = ["Mail", "Renderer"]

log = logging.getLogger(__name__)

MAX_SUBJECT_CHARS: Final = 200
MAX_DIGEST_LINE_CHARS: Final = 300  # the rendered text on a digest line
DIGEST_COLUMNS: Final = ("Time", "Node", "Level", "Kind", "Text", "Event")
FALLBACK_CHARSET: Final = "utf-8"


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


@dataclass(frozen=True, slots=True)
class _Content:
    """What a one-event mail says, worked out once and then written as plain text and,
    if configured, as HTML."""

    message: str  # the rendered catalog text (or the event's own text)
    action: str  # the rendered suggested action, or ""
    details: str  # the event's free text when a catalog text is shown, or ""
    # Label and value of each event field. "Event ID" is the catalog number
    # (``event_id``); "Event" is the event's UUID (``id``), which the Message-ID uses.
    fields: tuple[tuple[str, str], ...]
    params: tuple[tuple[str, str], ...]
    event_uuid: str


def _content_of(event: Event, decision: Decision) -> _Content:
    values = _values(event, decision.level)
    entry = decision.entry
    return _Content(
        message=_message(event, decision, values),
        action=render_template(entry.action, values) if entry is not None and entry.action else "",
        details=event.text if entry is not None and event.text else "",
        fields=(
            ("Cluster", event.cluster),
            ("Node", event.node),
            ("Module", event.module),
            ("Event ID", str(event.event_id)),
            ("Level", decision.level),
            ("Event time", f"{event.time.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC"),
        ),
        params=tuple(sorted(event.params.items())),
        event_uuid=event.id,
    )


def _body(content: _Content, *, intro: Sequence[str] = (), outro: Sequence[str] = ()) -> str:
    lines = [*intro, content.message, ""]
    if content.action:
        lines += ["Suggested action:", content.action, ""]
    if content.details:
        lines += ["Details:", content.details, ""]
    lines += [f"{label + ':':<12}{value}" for label, value in content.fields]
    if content.params:
        lines.append("Parameters:")
        lines += [f"  {key}: {value}" for key, value in content.params]
    lines += ["", *outro, f"Event: {content.event_uuid}", "-- ", "Sent by clusteralert."]
    return "\n".join(lines)


def _fits(charset: str, *texts: str) -> bool:
    try:
        for text in texts:
            text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


def _html(content: _Content, *, intro: Sequence[str] = ()) -> str:
    """The HTML alternative. Every value comes from the event or the catalog and is
    escaped; nothing from an event can become markup."""
    esc = html.escape
    rows = [
        *content.fields,
        *((f"Param {key}", value) for key, value in content.params),
        ("Event", content.event_uuid),
    ]
    parts = ["<!DOCTYPE html>", "<html><body>"]
    parts += [f"<p>{esc(line)}</p>" for line in intro if line]
    parts.append(f"<p><strong>{esc(content.message)}</strong></p>")
    if content.action:
        parts.append(f"<p>Suggested action: {esc(content.action)}</p>")
    if content.details:
        parts.append(f"<p>Details: {esc(content.details)}</p>")
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

    def render(
        self, event: Event, decision: Decision, *, to: tuple[str, ...] | None = None
    ) -> Mail:
        """The mail for one event, as mailed before incidents existed (and for a bare
        event on the mail queue, such as a replayed 0.1 dead letter). ``to`` replaces
        the routed recipients (the canary goes to ``[canary] to`` only)."""
        content = _content_of(event, decision)
        body = _body(content)
        html_body = _html(content) if self.config.html else ""
        return self._assemble(
            self._subject(event, decision.level, content.message),
            body,
            html_body,
            recipients=self.recipients(event, decision.level) if to is None else to,
            message_id=event.id,
            fields=_event_headers(event, decision.level),
            what=f"event {event.id}",
        )

    def render_notification(
        self, notification: Notification, decider: Callable[[Event], Decision]
    ) -> Mail:
        """The mail for a notification from the incident stage. ``decider`` gives the
        filter decision (level, catalog entry) of an event."""
        if notification.kind == "digest":
            return self._digest(notification, decider)
        [item] = notification.items
        event = item.event
        decision = decider(event)
        content = _content_of(event, decision)
        intro = _intro(notification.kind, item, decider)
        # A silence's summary is the stage's own: no node reported it.
        outro = [] if notification.kind == "silence" else _reported(item)
        body = _body(content, intro=intro, outro=outro)
        html_body = _html(content, intro=intro + outro) if self.config.html else ""
        threading: list[tuple[str, str]] = []
        if item.replies_to is not None:
            answered = f"<{item.replies_to}@{self.config.domain}>"
            threading = [("In-Reply-To", answered), ("References", answered)]
        return self._assemble(
            self._subject(event, decision.level, content.message),
            body,
            html_body,
            recipients=self.recipients(event, decision.level),
            message_id=event.id,
            fields=[
                *_event_headers(event, decision.level),
                ("X-Clusteralert-Kind", notification.kind),
                *threading,
            ],
            what=f"event {event.id}",
        )

    def _digest(self, notification: Notification, decider: Callable[[Event], Decision]) -> Mail:
        lines: list[str] = []
        rows: list[tuple[str, ...]] = []
        keys: Counter[str] = Counter()
        recipients: dict[str, None] = {}
        worst: Level = "info"
        events = 0
        for item in notification.items:
            for part in (item, item.resolved) if item.resolved else (item,):
                event = part.event
                decision = decider(event)
                message = _message(event, decision, _values(event, decision.level))
                message = _digest_note(item, part) + message
                if part.reports > 1:
                    message += f" ({part.reports} reports)"
                row = (
                    f"{event.time.strftime('%Y-%m-%d %H:%M:%S')} UTC",
                    event.node,
                    decision.level,
                    event.key,
                    _cut(message, MAX_DIGEST_LINE_CHARS),
                    event.id,
                )
                rows.append(row)
                lines.append("  ".join(row))
                keys[event.key] += part.reports
                events += part.reports
                if level_rank(decision.level) > level_rank(worst):
                    worst = decision.level
                recipients.update(dict.fromkeys(self.recipients(event, decision.level)))
        first = notification.first
        common = ", ".join(f"{key} x{count}" for key, count in keys.most_common(3))
        subject = f"[storm] {first.cluster}: {events} events in {notification.window:g} s: {common}"
        body = "\n".join(
            [
                f"A storm on {first.cluster}: {events} events in {len(notification.items)} "
                f"incident(s) were held for {notification.window:g} s and are reported here "
                "together, one line each (time, node, level, kind, text, event id).",
                "",
                *lines,
                "-- ",
                "Sent by clusteralert.",
            ]
        )
        html_body = _digest_html(subject, rows) if self.config.html else ""
        return self._assemble(
            _cut(one_line(subject), MAX_SUBJECT_CHARS),
            body,
            html_body,
            recipients=tuple(recipients),
            message_id=f"{DIGEST_PREFIX}{first.id}",
            fields=[
                ("X-Clusteralert-Kind", "digest"),
                ("X-Clusteralert-Level", worst),
                ("X-Clusteralert-Cluster", first.cluster),
            ],
            what=f"digest {first.id}",
        )

    def _subject(self, event: Event, level: Level, message: str) -> str:
        subject = one_line(
            render_template(self.config.subject, _subject_values(event, level, message))
        )
        if len(subject) > MAX_SUBJECT_CHARS:
            # An ellipsis the charset cannot encode would force the whole mail to utf-8.
            ellipsis = "\u2026" if _fits(self.config.charset, "\u2026") else "..."
            subject = subject[: MAX_SUBJECT_CHARS - len(ellipsis)] + ellipsis
        return subject

    def _assemble(
        self,
        subject: str,
        body: str,
        html_body: str,
        *,
        recipients: tuple[str, ...],
        message_id: str,
        fields: list[tuple[str, str]],
        what: str,
    ) -> Mail:
        """Head and body in the configured charset (UTF-8 when it cannot say it all).
        ``fields``: headers after the fixed ones; values are encoded here."""
        charset = self.config.charset
        texts = (subject, body, html_body, self.config.from_name, *(v for _, v in fields))
        if not _fits(charset, *texts):
            log.info(
                "%s: text cannot be encoded in %s; sending this mail as %s",
                what,
                charset,
                FALLBACK_CHARSET,
            )
            charset = FALLBACK_CHARSET
        if self.config.subject_encode:
            subject_bytes = header_value(subject, charset).encode("ascii")
        else:
            # Legacy receivers: the subject raw in the charset (still one line).
            subject_bytes = subject.encode(charset)
        headers = [
            # First, so that a relay with a sender of its own can replace it (Mail.with_sender).
            ("From", from_header(self.config.sender, self.config.from_name, charset)),
            # One address per line: a long list must not exceed the 998-byte line limit.
            ("To", ",\r\n ".join(recipients)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("Message-ID", f"<{message_id}@{self.config.domain}>"),
            ("MIME-Version", "1.0"),
            ("Auto-Submitted", "auto-generated"),
            *((name, header_value(value, charset)) for name, value in fields),
        ]
        head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("ascii")
        head += b"Subject: " + subject_bytes + b"\r\n"
        return Mail(
            event_id=message_id,
            sender=self.config.sender,
            recipients=recipients,
            data=head + mail_content(body, html_body, charset),
            charset=charset,
            sender_name=self.config.from_name,
        )


def _event_headers(event: Event, level: Level) -> list[tuple[str, str]]:
    return [
        ("X-Clusteralert-Module", event.module),
        ("X-Clusteralert-Event", str(event.event_id)),
        ("X-Clusteralert-Level", level),
        ("X-Clusteralert-Node", event.node),
        ("X-Clusteralert-Cluster", event.cluster),
    ]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _duration(seconds: float | None) -> str:
    """``1 h 2 min 3 s``: how long an incident lasted, as an operator reads it."""
    if seconds is None:
        return "an unknown time"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min {secs} s"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{seconds:.1f} s"


def _reported(item: Item) -> list[str]:
    """The "Reported by:" line: every reporter, and how often each reported."""
    who = ", ".join(f"{name} ({count})" for name, count in item.reporters)
    noun = "report" if item.reports == 1 else "reports"
    return [f"Reported by: {who}; {item.reports} {noun}"]


def _intro(kind: str, item: Item, decider: Callable[[Event], Decision]) -> list[str]:
    """What a notification adds above the event's own text."""
    if kind == "repeat":
        return [
            f"Still happening: seen {item.since + 1} more time(s) since the last mail "
            "about this incident.",
            "",
        ]
    if kind == "recovery":
        return [
            f"Resolved: this ends the incident in this thread after {_duration(item.duration)}.",
            "",
        ]
    if item.resolved is not None:
        end = item.resolved.event
        decision = decider(end)
        message = _message(end, decision, _values(end, decision.level))
        return [
            f"Already resolved after {_duration(item.duration)}: {message} "
            f"(event {end.id}, reported by "
            f"{', '.join(name for name, _ in item.resolved.reporters)})",
            "",
        ]
    return []


def _digest_note(item: Item, part: Item) -> str:
    """What a digest line says besides the event's text: whether it ends an incident or
    repeats one (then it answers an earlier mail)."""
    if part is item.resolved or (item.replies_to is not None and item.duration is not None):
        return f"[ends an incident after {_duration(item.duration)}] "
    if item.replies_to is not None:
        return f"[still happening: {item.since + 1} more since the last mail] "
    return ""


def _digest_html(title: str, rows: list[tuple[str, ...]]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", "<html><body>", f"<p><strong>{esc(title)}</strong></p>", "<table>"]
    parts.append("<tr>" + "".join(f'<th align="left">{h}</th>' for h in DIGEST_COLUMNS) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows]
    parts += ["</table>", "</body></html>"]
    return "\n".join(parts)
