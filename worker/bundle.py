"""A bundle from the mail queue (see :class:`~shared.notification.Bundle`) as the
delivery stage takes it: each part a message of its own on its way through the pipeline,
and the bundle settled when its last part is.

A part that is sent, retried or dead-lettered counts as settled; the bundle is acked
once every part is. A part whose retry or dead letter the broker did not confirm gives
the whole bundle back when the last part settles, and a part abandoned (at a reconnect
or a shutdown) never settles, which leaves the bundle unacked for the broker to hand out
again. Either way nothing is lost and what was already mailed may be mailed again, as
with any message redelivered.

A bundle that comes back (its ``redelivered`` flag) is not mailed as a bundle again: the
worker that gets it republishes its parts as messages of their own, confirmed, and only
then acks it. A part that crashes workers then takes only itself to the queue's delivery
limit, not the parts it came with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shared.errors import InvalidEvent
from shared.notification import split_bundle
from shared.topology import WORK_QUEUE
from worker.broker import Delivery, Outgoing, copy_properties
from worker.retry_policy import HEADER_PREFIX

__all__ = ["Part", "parts_of", "republished", "whole_deliveries"]

log = logging.getLogger(__name__)

_PART_CONTENT_TYPE = "application/json"


class _Whole:
    """A bundle's delivery and how many of its parts are still unsettled."""

    __slots__ = ("_left", "_refused", "delivery")

    def __init__(self, delivery: Delivery, parts: int):
        self.delivery = delivery
        self._left = parts
        self._refused = False

    def finish(self, *, refused: bool) -> Delivery | None:
        """One part settled: the bundle's delivery to ack when that was the last part
        and every part found its home; given back here when one did not."""
        self._left -= 1
        self._refused = self._refused or refused
        if self._left:
            return None
        if self._refused:
            log.warning(
                "returning the bundle %s to the queue: a notification in it has no "
                "certain home; those already mailed will be mailed again",
                self.delivery.properties.get("message_id", "?"),
            )
            self.delivery.requeue()
            return None
        return self.delivery


class Part(Delivery):
    """One notification of a bundle, handled and settled as a delivery of its own: its
    body and message id are its own, the rest is the bundle's."""

    __slots__ = ("_whole",)

    def __init__(self, whole: _Whole, body: bytes, message_id: str):
        bundle = whole.delivery
        self._whole = whole
        self._channel = None
        self._unsettled = None
        self.delivery_tag = bundle.delivery_tag
        self.routing_key = bundle.routing_key
        self.body = body
        self.properties = _part_properties(bundle, message_id)
        self.headers = bundle.headers
        self.received = bundle.received
        self.redelivered = bundle.redelivered

    def sent(self) -> Delivery | None:
        """Settled by its mail: the bundle's delivery when it is now due an ack."""
        return self._whole.finish(refused=False)

    def ack(self, *, multiple: bool = False) -> None:
        assert not multiple, "a part is acked on its own"
        whole = self.sent()
        if whole is not None:
            whole.ack()

    def requeue(self) -> None:
        self._whole.finish(refused=True)


def _part_properties(bundle: Delivery, message_id: str) -> dict[str, object]:
    return {**bundle.properties, "message_id": message_id, "content_type": _PART_CONTENT_TYPE}


def parts_of(delivery: Delivery) -> list[Part] | None:
    """The parts of a bundle delivered for the first time; None when its framing is
    bad (then the pipeline refuses it whole, and it is dead-lettered as it came)."""
    try:
        bundle = split_bundle(delivery.body)
    except InvalidEvent:  # the pipeline names the fault when it refuses the whole
        return None
    whole = _Whole(delivery, len(bundle.parts))
    return [Part(whole, body, mid) for mid, body in zip(bundle.ids, bundle.parts, strict=True)]


def republished(delivery: Delivery) -> list[Outgoing] | None:
    """A redelivered bundle's parts as messages of their own for the mail queue, with
    the bundle's own headers (a replay's mark, say) and not the broker's; None when its
    framing is bad."""
    try:
        bundle = split_bundle(delivery.body)
    except InvalidEvent:
        return None
    headers = {k: v for k, v in delivery.headers.items() if k.startswith(HEADER_PREFIX)}
    return [
        Outgoing(body, copy_properties(_part_properties(delivery, mid), headers), "", WORK_QUEUE)
        for mid, body in zip(bundle.ids, bundle.parts, strict=True)
    ]


def whole_deliveries(sent: Sequence[Delivery]) -> list[Delivery]:
    """The deliveries to ack for ``sent`` (settled by their mails): each one that is a
    delivery of its own, and each bundle whose last part this was."""
    due: list[Delivery] = []
    for delivery in sent:
        if isinstance(delivery, Part):
            whole = delivery.sent()
            if whole is not None:
                due.append(whole)
        else:
            due.append(delivery)
    return due
