"""The pipeline's own events, which watch the pipeline rather than a cluster: the node
agent's heartbeat, the incident stage's canary, and a standby worker's probe.

They are ordinary events on the wire (so they take the same exchange, queue and codec as
an alert, which is what makes them worth sending) under the reserved module
``clusteralert``. The stages pick them out by key before the filter, so no catalog,
filter, route, incident or storm ever sees them.
"""

from __future__ import annotations

import socket
from typing import Final, Literal

from shared.event import Event, new_event

__all__ = [
    "CANARY_CLUSTER",
    "OWN_MODULE",
    "OwnKind",
    "canary_event",
    "heartbeat_event",
    "heartbeat_interval",
    "own_kind",
    "probe_event",
    "worker_only",
    "worker_only_key",
]

OWN_MODULE: Final = "clusteralert"
OwnKind = Literal["heartbeat", "canary", "probe"]
_KINDS: Final[dict[int, OwnKind]] = {1: "heartbeat", 2: "canary", 3: "probe"}
_IDS: Final[dict[OwnKind, int]] = {kind: number for number, kind in _KINDS.items()}
# The canary is about the pipeline, not a cluster: it names the worker that sent it.
CANARY_CLUSTER: Final = "clusteralert"


def own_kind(event: Event) -> OwnKind | None:
    """Which of the pipeline's own events this is, or None for a cluster event. An
    unknown event id under the reserved module is an ordinary event (filtered as such)."""
    if event.module != OWN_MODULE:
        return None
    return _KINDS.get(event.event_id)


# Sent by workers only: a topic permission keeps the producers' user off their routing
# keys, and the stage refuses one that arrives under another key (worker_only_key).
_WORKER_ONLY: Final[tuple[OwnKind, ...]] = ("canary", "probe")
_WORKER_ONLY_KEYS: Final = tuple(f"{OWN_MODULE}.{_IDS[kind]}." for kind in _WORKER_ONLY)


def worker_only(event: Event) -> OwnKind | None:
    """The kind of ``event`` when only a worker may send it (the canary, the probe)."""
    kind = own_kind(event)
    return kind if kind in _WORKER_ONLY else None


def worker_only_key(key: str) -> bool:
    """Whether a routing key is one only workers publish under: a node's spool must
    never hold such an event, and the broker refuses it from a producer anyway."""
    return key.startswith(_WORKER_ONLY_KEYS)


def _own(kind: OwnKind, cluster: str, node: str, params: dict[str, str], text: str) -> Event:
    return new_event(
        module=OWN_MODULE,
        event_id=_IDS[kind],
        cluster=cluster,
        node=node,
        source=kind,
        level="info",
        params=params,
        text=text,
    )


def heartbeat_event(cluster: str, node: str, interval: float) -> Event:
    """A node agent's "still here", stamped now; ``interval`` tells the stage (and the
    alert rule) how soon to expect the next one."""
    return _own("heartbeat", cluster, node, {"interval": f"{interval:g}"}, "node agent heartbeat")


def heartbeat_interval(event: Event) -> float:
    """The interval a heartbeat announced, 0 when it is missing or not a positive number."""
    try:
        value = float(event.params.get("interval", "0"))
    except ValueError:
        return 0.0
    return value if 0 < value < float("inf") else 0.0


def canary_event() -> Event:
    node = socket.gethostname()
    text = f"clusteralert canary from the incident stage on {node}: the whole mail path works"
    return _own("canary", CANARY_CLUSTER, node, {}, text)


def probe_event() -> Event:
    """Sent by a worker that has not seen itself become the active stage: whichever stage
    is active takes it (and so learns that it is), and acks it unmailed."""
    return _own("probe", CANARY_CLUSTER, socket.gethostname(), {}, "incident stage probe")
