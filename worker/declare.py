"""Declare the topology of :mod:`shared.topology` on a broker channel."""

from __future__ import annotations

from typing import Any

from shared.topology import BINDINGS, EXCHANGES, QUEUES

__all__ = ["declare_topology"]


def declare_topology(channel: Any) -> None:
    """Idempotent on a broker that already has the same topology. A queue that exists
    with other arguments makes the broker close the channel (PRECONDITION_FAILED), which
    the caller reports: changing a queue's type or limits needs an operator decision."""
    for exchange in EXCHANGES:
        channel.exchange_declare(
            exchange=exchange.name, type=exchange.type, durable=exchange.durable, auto_delete=False
        )
    for queue in QUEUES:
        channel.queue_declare(
            queue=queue.name,
            durable=queue.durable,
            auto_delete=False,
            arguments=dict(queue.arguments),
        )
    for binding in BINDINGS:
        channel.queue_bind(
            queue=binding.queue, exchange=binding.exchange, routing_key=binding.routing_key
        )
