"""The mail that ends a silence: what it held back, per cluster, kind and node, with the
first and last time, as one ``silence`` notification through the mail queue like any
other (README, "Silences").

The notification carries an event the stage makes (module ``clusteralert``), whose id is
derived from the silence's: if two stages send the summary of one silence (one died
between publishing it and recording that it did), both mails have the same Message-ID.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Final

from shared.event import MAX_PARAMS, Event, new_event
from shared.notification import Item, Notification
from shared.silence import HeldRow, Silence, format_time

__all__ = ["SUMMARY_EVENT_ID", "SUMMARY_MODULE", "summary"]

SUMMARY_MODULE: Final = "clusteralert"
SUMMARY_EVENT_ID: Final = 100
_NAMESPACE: Final = uuid.UUID("5c1e4ce5-0000-4000-8000-000000000013")
# One param per row; the last free one says how many rows did not fit.
_MAX_ROWS: Final = MAX_PARAMS - 1


def _row(row: HeldRow) -> str:
    return (
        f"{row.key} on {row.node} ({row.cluster}): {row.count} event(s), "
        f"first {format_time(row.first)}, last {format_time(row.last)}"
    )


def summary_event(
    silence: Silence, rows: Sequence[HeldRow], *, ended: datetime, expired_by: str | None
) -> Event:
    total = sum(row.count for row in rows)
    how = f"expired by {expired_by}" if expired_by else "reached its end"
    text = (
        f"Silence {silence.id} ({silence.describe()}) by {silence.author} {how} at "
        f"{format_time(ended)}; it held back {total} event(s) of {len({r.key for r in rows})} "
        f"kind(s) on {len({r.node for r in rows})} node(s). Comment: {silence.comment}"
    )
    params = {f"held_{i:03d}": _row(row) for i, row in enumerate(rows[:_MAX_ROWS], 1)}
    if len(rows) > _MAX_ROWS:
        rest = rows[_MAX_ROWS:]
        params["held_more"] = (
            f"{len(rest)} more row(s), {sum(r.count for r in rest)} event(s) "
            "(see 'clusteralert-worker silence list --all --json')"
        )
    clusters = {row.cluster for row in rows} | ({silence.cluster} if silence.cluster else set())
    return new_event(
        module=SUMMARY_MODULE,
        event_id=SUMMARY_EVENT_ID,
        cluster=clusters.pop() if len(clusters) == 1 else "*",
        node=silence.node or "*",
        source="silence",
        level="info",
        params=params,
        text=text,
        time=ended,
        id=str(uuid.uuid5(_NAMESPACE, silence.id)),
        reporter=socket.gethostname(),
    )


def summary(
    silence: Silence, rows: Sequence[HeldRow], *, ended: datetime, expired_by: str | None
) -> Notification:
    event = summary_event(silence, rows, ended=ended, expired_by=expired_by)
    return Notification("silence", (Item(event, (event.id,), ((event.reported_by, 1),)),))
