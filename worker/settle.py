"""Settle stage: carry out a pipeline :class:`Outcome` on the broker, on the thread that
owns the connection.

A message leaves the work queue only after its next home is certain: a retry or a dead
letter is published with a publisher confirm and ``mandatory`` first, and only then is the
original acked. If the publish fails (:class:`~worker.broker.PublishNotConfirmed`), the
original stays unacked for the caller to give back.
"""

from __future__ import annotations

from typing import assert_never

from shared.topology import DLX_EXCHANGE, RETRY_EXCHANGE
from worker.broker import Broker, Delivery, copy_properties
from worker.outcome import Acked, DeadLetter, Outcome, Retry

__all__ = ["describe_delivery", "settle"]


def settle(broker: Broker, delivery: Delivery, outcome: Outcome) -> None:
    match outcome:
        case Acked():
            delivery.ack()
            return
        case Retry(rung=rung):
            exchange, routing_key = RETRY_EXCHANGE, rung
        case DeadLetter():
            exchange, routing_key = DLX_EXCHANGE, ""
        case _:
            assert_never(outcome)
    properties = copy_properties(dict(delivery.properties), dict(outcome.headers))
    broker.publish_confirmed(delivery.body, properties, exchange, routing_key)
    delivery.ack()


def describe_delivery(delivery: Delivery) -> str:
    """How logs name a message before (or without) decoding it."""
    # The producer sets message_id to the event id; it is the only name a message has
    # before (or without) decoding. repr() keeps a hostile one on one line.
    message_id = delivery.properties.get("message_id")
    if isinstance(message_id, str) and message_id:
        return f"message {message_id[:64]!r}"
    return "a message without message_id"
