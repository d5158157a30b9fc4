"""The RabbitMQ topology as data (docs/design.md, "Queues").

The worker declares exactly this, and ``deploy/rabbitmq`` definitions must match it; a
test compares the two. Keeping it as plain data means neither side imports a client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "BINDINGS",
    "DEAD_QUEUE",
    "DLX_EXCHANGE",
    "EVENTS_EXCHANGE",
    "EXCHANGES",
    "INCOMING_QUEUE",
    "QUEUES",
    "RETRY_DELAYS",
    "RETRY_EXCHANGE",
    "SILENCES_STREAM",
    "UNBINDINGS",
    "WORK_QUEUE",
    "Binding",
    "Exchange",
    "Queue",
    "retry_queue_name",
]

EVENTS_EXCHANGE: Final = "clusteralert.events"
RETRY_EXCHANGE: Final = "clusteralert.retry"
DLX_EXCHANGE: Final = "clusteralert.dlx"
# The incident stage's input: every event. One consumer in the whole deployment is
# active (single active consumer); the others stand by to take over.
INCOMING_QUEUE: Final = "clusteralert.incoming"
# The delivery stage's input: notifications from the incident stage.
WORK_QUEUE: Final = "clusteralert.mail"
DEAD_QUEUE: Final = "clusteralert.dead"
# Silences and what they held back (shared.silence): a stream, so that every worker reads
# every record from the first one, and nothing about silences lives outside RabbitMQ.
SILENCES_STREAM: Final = "clusteralert.silences"

# How often a message may be delivered from the work queue before the broker dead-letters
# it. It backs up the worker's own classification: a message that kills the worker
# process every time ends in the DLQ instead of crash-looping the fleet.
WORK_DELIVERY_LIMIT: Final = 20

# The delayed-retry ladder: (name suffix, TTL in milliseconds). Fixed per-queue TTLs,
# never per-message expiry, which would block a quorum queue behind its head.
RETRY_DELAYS: Final[tuple[tuple[str, int], ...]] = (
    ("30s", 30_000),
    ("5m", 300_000),
    ("30m", 1_800_000),
)


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: Literal["topic", "direct", "fanout"]
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, object] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


def retry_queue_name(suffix: str) -> str:
    return f"clusteralert.retry.{suffix}"


EXCHANGES: Final[tuple[Exchange, ...]] = (
    Exchange(EVENTS_EXCHANGE, "topic"),
    Exchange(RETRY_EXCHANGE, "direct"),
    Exchange(DLX_EXCHANGE, "fanout"),
)

QUEUES: Final[tuple[Queue, ...]] = (
    Queue(
        INCOMING_QUEUE,
        {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            # The same backstop as the work queue's: an event that kills the active stage
            # every time goes to the DLQ instead of taking down every standby in turn.
            # Held events come back once per stage that dies holding them, so the limit
            # also bounds how many failovers one event survives.
            "x-dead-letter-exchange": DLX_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": WORK_DELIVERY_LIMIT,
        },
    ),
    Queue(
        WORK_QUEUE,
        {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DLX_EXCHANGE,
            # Quorum dead-lettering is at-most-once unless this is set, and at-least-once
            # requires reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": WORK_DELIVERY_LIMIT,
        },
    ),
    *(
        Queue(
            retry_queue_name(suffix),
            {
                "x-queue-type": "quorum",
                "x-message-ttl": ttl,
                # Back to the work queue only, through the default exchange: re-publishing
                # to the events exchange would also reach any other queue bound there.
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": WORK_QUEUE,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for suffix, ttl in RETRY_DELAYS
    ),
    # No delivery limit of its own. Browsing never hands messages back (worker.dlq), so it
    # does not count toward a limit a policy or RabbitMQ 4's default sets.
    Queue(DEAD_QUEUE, {"x-queue-type": "quorum"}),
    Queue(
        SILENCES_STREAM,
        {
            "x-queue-type": "stream",
            # Bounded, and in small segments because retention drops whole segments
            # only. The age outlasts the longest silence allowed (30 days) and its
            # summary; the size holds years of silences, and about a month of an
            # active silence that holds back a storm (one record of counts per second).
            "x-max-age": "60D",
            "x-max-length-bytes": 512 * 1024 * 1024,
            "x-stream-max-segment-size-bytes": 8 * 1024 * 1024,
        },
    ),
)

BINDINGS: Final[tuple[Binding, ...]] = (
    Binding(EVENTS_EXCHANGE, INCOMING_QUEUE, "#"),
    *(Binding(RETRY_EXCHANGE, retry_queue_name(suffix), suffix) for suffix, _ in RETRY_DELAYS),
    Binding(DLX_EXCHANGE, DEAD_QUEUE, ""),
)

# Bindings of earlier versions that the worker removes at start, so a deployment upgrades
# in place: 0.1 bound the work queue to the events exchange, which would now mail every
# event a second time, past the incident stage.
UNBINDINGS: Final[tuple[Binding, ...]] = (Binding(EVENTS_EXCHANGE, WORK_QUEUE, "#"),)
