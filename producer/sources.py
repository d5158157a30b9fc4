"""Event sources on the node that are called once per event: the Pacemaker alert agent
and the keepalived notify script. Each turns its caller's input into an :class:`Event`
(or decides to skip it); spooling is the caller's job.

These run inside a cluster manager's hook, often on a failing node, so they import
nothing heavy and never touch the network.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from shared.errors import InvalidEvent
from shared.event import Event, new_event

__all__ = [
    "KEEPALIVED_EVENTS",
    "PACEMAKER_EVENTS",
    "keepalived_event",
    "pacemaker_event",
]

# Stable, documented event ids (module "pacemaker"); the shipped catalog describes them.
PACEMAKER_EVENTS: Final = {
    "node_lost": 1,
    "node_member": 2,
    "fencing_ok": 11,
    "fencing_failed": 12,
    "resource_ok": 21,
    "resource_failed": 22,
    "attribute": 31,
    "attribute_deleted": 32,
    "other": 99,
}
# DELETED: an instance removed by a reload, sent instead of FAULT when the instance has
# notify_deleted (keepalived 2.2.7 has it); without it keepalived reports FAULT.
KEEPALIVED_EVENTS: Final = {"MASTER": 1, "BACKUP": 2, "FAULT": 3, "STOP": 4, "DELETED": 5}
KEEPALIVED_OTHER: Final = 9

# Namespace for deterministic event ids: Pacemaker runs the agent once per recipient,
# and those runs must spool one event, not several.
_PACEMAKER_NS: Final = uuid.UUID("6b1b8c1e-5f0e-4f7a-9a55-3c0f6c1d2e11")
_PREFIX: Final = "CRM_alert_"
# Variables kept as params (name without the prefix). The recipient is kept for the mail
# but never chooses where mail goes: routing is the worker's config.
_PARAMS: Final = (
    "kind",
    "node",
    "nodeid",
    "desc",
    "task",
    "rc",
    "rsc",
    "interval",
    "status",
    "target_rc",
    "exec_time",
    "attribute_name",
    "attribute_value",
    "recipient",
    "node_sequence",
    "version",
)
_EXEC_CANCELLED: Final = "1"  # Pacemaker's PCMK_EXEC_CANCELLED status
# OCF return codes a probe (a one-off monitor, interval 0) reports when it finds the
# resource running or promoted. Pacemaker expects "not running" (7) from a probe, but
# either answer is the state it asked for, not a failure: it records no fail count.
_PROBE_FOUND_ACTIVE: Final = frozenset({"0", "8"})
# Fencing alerts carry the notification type (st_notify_fence) in CRM_alert_task; the
# action is in the description: "Operation reboot of node2 by node1 for ...: OK".
_FENCING_DESC_RE: Final = re.compile(r"^Operation (\S+) of ")
_NOTIFY_PREFIX: Final = "st_notify"
# What identifies one alert across its recipients' runs. Pacemaker takes one time stamp
# per alert and passes it to every recipient's run, but increments node_sequence for each
# run, so the sequence and the recipient are left out. The formatted time stamp is only a
# fallback (Pacemaker 1.1 has no epoch variables): its format may differ per recipient.
_IDENTITY: Final = (
    "kind",
    "node",
    "rsc",
    "task",
    "interval",
    "rc",
    "status",
    "desc",
    "attribute_name",
    "attribute_value",
)


def _event_time(env: Mapping[str, str]) -> datetime | None:
    epoch = env.get(_PREFIX + "timestamp_epoch", "")
    usec = env.get(_PREFIX + "timestamp_usec", "0") or "0"
    if not epoch.isdigit():
        return None
    micro = int(usec) if usec.isdigit() else 0
    try:
        return datetime.fromtimestamp(int(epoch) + micro / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _pacemaker_outcome(kind: str, get: Mapping[str, str]) -> tuple[str, str] | None:
    """(outcome name, level) for an alert, or None to skip it."""
    if kind == "node":
        if get.get("desc", "").lower() == "member":
            return "node_member", "info"
        return "node_lost", "error"
    if kind == "fencing":
        return ("fencing_ok", "warning") if get.get("rc") == "0" else ("fencing_failed", "error")
    if kind == "resource":
        if get.get("status") == _EXEC_CANCELLED or get.get("desc") == "Cancelled":
            return None  # a cancelled operation is bookkeeping, not an event
        if get.get("status", "0") != "0":
            return "resource_failed", "error"
        if get.get("rc") == get.get("target_rc", "0") or _probe_found_active(get):
            return "resource_ok", "info"
        return "resource_failed", "error"
    if kind == "attribute":
        # attrd_updater -D sends the name with an empty value.
        if not get.get("attribute_value"):
            return "attribute_deleted", "info"
        return "attribute", "info"
    return "other", "warning"


def _probe_found_active(get: Mapping[str, str]) -> bool:
    return (
        get.get("task") == "monitor"
        and get.get("interval", "0") == "0"
        and get.get("rc") in _PROBE_FOUND_ACTIVE
    )


def _fencing_action(get: Mapping[str, str]) -> str:
    """The fencing action (reboot, off, on): from the description, else from the task
    when it is an action rather than the notification type."""
    found = _FENCING_DESC_RE.match(get.get("desc", ""))
    if found:
        return found.group(1)
    task = get.get("task", "")
    return task if task and not task.startswith(_NOTIFY_PREFIX) else "unknown action"


def _identity(env: Mapping[str, str]) -> str:
    if env.get(_PREFIX + "timestamp_epoch"):
        when: tuple[str, ...] = ("timestamp_epoch", "timestamp_usec")
    else:
        when = ("timestamp",)
    return "|".join(env.get(_PREFIX + key, "") for key in (*_IDENTITY, *when))


def pacemaker_event(env: Mapping[str, str], *, cluster: str, fallback_node: str) -> Event | None:
    """The event for one Pacemaker alert (``CRM_alert_*`` environment), or None when the
    alert is not worth an event (a cancelled operation). ``fallback_node`` is this node:
    the event's reporter, and its node when the alert names none."""
    kind = env.get(_PREFIX + "kind", "")
    if not kind:
        raise InvalidEvent("CRM_alert_kind is not set: run this as a Pacemaker alert agent")
    values = {name: env[_PREFIX + name] for name in _PARAMS if _PREFIX + name in env}
    outcome = _pacemaker_outcome(kind, values)
    if outcome is None:
        return None
    name, level = outcome
    if kind == "fencing":
        values["action"] = _fencing_action(values)
    text = None
    if name == "other":
        text = f"Pacemaker alert of kind {kind!r}: {values.get('desc', '')}".strip()
    return new_event(
        # The reporter is part of the id: every node reports the same node loss, and each
        # report is an event of its own (the worker merges them into one incident).
        id=str(uuid.uuid5(_PACEMAKER_NS, f"{_identity(env)}|{fallback_node}")),
        module="pacemaker",
        event_id=PACEMAKER_EVENTS[name],
        level=level,
        cluster=cluster,
        node=values.get("node") or fallback_node,
        params=values,
        text=text,
        time=_event_time(env),
        source="pacemaker",
        reporter=fallback_node,
    )


def keepalived_event(args: Sequence[str], *, cluster: str, node: str) -> Event:
    """The event for a keepalived notify call: ``GROUP|INSTANCE NAME STATE PRIORITY``."""
    if len(args) < 3:
        raise InvalidEvent(
            "keepalived: expected GROUP|INSTANCE NAME STATE [PRIORITY], "
            f"got {len(args)} argument(s)"
        )
    kind, name, state = args[0], args[1], args[2].upper()
    priority = args[3] if len(args) > 3 else ""
    event_id = KEEPALIVED_EVENTS.get(state, KEEPALIVED_OTHER)
    level = {1: "warning", 2: "info", 3: "error"}.get(event_id, "warning")
    params = {"type": kind, "name": name, "state": state}
    if priority:
        params["priority"] = priority
    return new_event(
        module="keepalived",
        event_id=event_id,
        level=level,
        cluster=cluster,
        node=node,
        params=params,
        source="keepalived",
        reporter=node,
    )
