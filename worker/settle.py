"""Settle stage: turn a pipeline :class:`Outcome` into broker operations, on the thread
that owns the connection.

A message leaves the work queue only after its next home is certain: a retry or a dead
letter is published with a publisher confirm and ``mandatory`` first, and only then is the
original acked. If the publish fails, the original stays unacked and comes back.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Final

import amqp

from shared.errors import ClusteralertError
from shared.topology import DLX_EXCHANGE, RETRY_EXCHANGE
from worker.outcome import Outcome

__all__ = ["SettleError", "Settler", "copy_properties"]

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT: Final = 30.0
_COPIED_PROPERTIES: Final = (
    "content_type",
    "content_encoding",
    "message_id",
    "timestamp",
    "correlation_id",
    "app_id",
)


class SettleError(ClusteralertError):
    """A retry or dead letter could not be confirmed; the original was not acked."""


def copy_properties(properties: dict[str, Any], headers: dict[str, Any]) -> dict[str, Any]:
    """The properties to re-publish a message with: persistent, same identity."""
    copied = {k: properties[k] for k in _COPIED_PROPERTIES if properties.get(k) is not None}
    copied["delivery_mode"] = 2
    copied["application_headers"] = headers
    return copied


class Settler:
    def __init__(self, connection: Any):
        self._connection = connection
        self._channel: Any = None

    def _publish_channel(self) -> Any:
        # A channel of its own in confirm mode: the consuming channel stays unconfirmed,
        # and a publish failure closes only this one.
        if self._channel is None or not self._channel.is_open:
            self._channel = self._connection.channel()
            self._channel.confirm_select()
        return self._channel

    def publish_confirmed(
        self, body: bytes, properties: dict[str, Any], exchange: str, routing_key: str
    ) -> None:
        channel = self._publish_channel()
        message = amqp.Message(body, **properties)
        try:
            channel.basic_publish_confirm(
                message,
                exchange=exchange,
                routing_key=routing_key,
                mandatory=True,
                confirm_timeout=CONFIRM_TIMEOUT,
            )
        except Exception as exc:
            # A fresh channel next time, as a late confirm of this publish must not be
            # taken for the next one's. A nack or a return leaves this one open: close
            # it rather than leak a channel per failed settle. (Not after a timeout or a
            # socket error: the close would wait on a broker that does not answer.)
            self._channel = None
            if not isinstance(exc, OSError) and channel.is_open:
                with contextlib.suppress(Exception):
                    channel.close()
            raise SettleError(
                f"publish to {exchange or 'default exchange'} ({routing_key}) not confirmed: {exc}"
            ) from exc

    def settle(self, message: Any, outcome: Outcome) -> None:
        if outcome.action == "ack":
            message.ack()
            return
        headers = dict(outcome.headers or {})
        properties = copy_properties(dict(message.properties), headers)
        if outcome.action == "retry":
            assert outcome.rung is not None
            self.publish_confirmed(message.body, properties, RETRY_EXCHANGE, outcome.rung)
        else:
            self.publish_confirmed(message.body, properties, DLX_EXCHANGE, "")
        message.ack()
