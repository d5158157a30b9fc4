"""Node heartbeats on the active incident stage: each one moves its node's last-seen
time forward, and is acked unmailed.

The gauge keeps the newest time seen, by the heartbeat's own time rather than its
arrival: heartbeats that waited in the queue while no stage was active must not make a
node look fresher than it is, nor older ones move it back. A time later than the
heartbeat's arrival counts as its arrival: one heartbeat from a clock a year ahead (or a
forged one) would otherwise hold the node's time a year ahead, and its silence unseen.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from shared.event import Event
from shared.own_events import heartbeat_interval
from worker.metrics import Metrics

__all__ = ["MAX_NODES", "NodeHeartbeats"]

log = logging.getLogger(__name__)

# Label values come from events, which anyone allowed to publish can make up: the number
# of series is bounded, as a real deployment has far fewer nodes than this.
MAX_NODES: Final = 10_000


class NodeHeartbeats:
    def __init__(self, metrics: Metrics, max_nodes: int = MAX_NODES):
        self.metrics = metrics
        self.max_nodes = max_nodes
        self._last: dict[tuple[str, str], float] = {}
        self._warned = False

    def seen(self, event: Event) -> None:
        node = (event.cluster, event.node)
        when = min(event.time.timestamp(), time.time())
        previous = self._last.get(node)
        if previous is None and len(self._last) >= self.max_nodes:
            if not self._warned:
                self._warned = True
                log.warning(
                    "heartbeats from more than %d nodes: not tracking %s/%s or any further node",
                    self.max_nodes,
                    event.cluster,
                    event.node,
                )
            return
        if previous is not None and when <= previous:
            return
        if previous is None:
            log.info("first heartbeat from node %s of cluster %s", event.node, event.cluster)
        self._last[node] = when
        self.metrics.node_last_seen.labels(*node).set(when)
        interval = heartbeat_interval(event)
        if interval:
            self.metrics.node_heartbeat_interval.labels(*node).set(interval)
