"""Render stage: an event and its filter decision become the bytes of one mail
(DESIGN.md, "Mail").

The Message-ID is derived from the event id, so every copy of a mail (after a crash or a
replay) carries the same one and mail clients can collapse duplicates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Final

from shared.config import MailConfig
from shared.event import Event
from shared.filter import Decision
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


class Renderer:
    def __init__(self, config: MailConfig, recipients: tuple[str, ...] | None = None):
        self.config = config
        self.recipients = recipients if recipients is not None else config.to

    def render(self, event: Event, decision: Decision) -> Mail:
        values = _values(event, decision.level)
        message = _message(event, decision, values)
        subject = one_line(render_template(self.config.subject, {**values, "message": message}))
        if len(subject) > MAX_SUBJECT_CHARS:
            subject = subject[: MAX_SUBJECT_CHARS - 1] + "\u2026"
        body = _body(event, decision, message, values)

        charset = self.config.charset
        header_fields = (event.module, event.node, event.cluster)
        if not _fits(charset, subject, body, *header_fields):
            log.info(
                "event %s: text cannot be encoded in %s; sending this mail as %s",
                event.id,
                charset,
                FALLBACK_CHARSET,
            )
            charset = FALLBACK_CHARSET

        encoding, payload = body_part(body, charset)
        headers = [
            ("From", self.config.sender),
            # One address per line: a long list must not exceed the 998-byte line limit.
            ("To", ",\r\n ".join(self.recipients)),
            ("Subject", header_value(subject, charset)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("Message-ID", f"<{event.id}@{self.config.domain}>"),
            ("MIME-Version", "1.0"),
            ("Content-Type", f'text/plain; charset="{charset}"'),
            ("Content-Transfer-Encoding", encoding),
            ("Auto-Submitted", "auto-generated"),
            ("X-Clusteralert-Module", event.module),
            ("X-Clusteralert-Event", str(event.event_id)),
            ("X-Clusteralert-Level", decision.level),
            ("X-Clusteralert-Node", header_value(event.node, charset)),
            ("X-Clusteralert-Cluster", header_value(event.cluster, charset)),
        ]
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        return Mail(
            event_id=event.id,
            sender=self.config.sender,
            recipients=self.recipients,
            data=head.encode("ascii") + b"\r\n" + payload,
            charset=charset,
        )
