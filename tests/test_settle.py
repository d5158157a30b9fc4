"""The settle stage (unit level, with recording stand-ins for the broker and the
delivery): the original is acked only after its retry or dead letter was confirmed, with
the message's identity and the new headers, and never when the publish failed."""

from __future__ import annotations

from typing import Any

import pytest

from shared.topology import DLX_EXCHANGE, RETRY_EXCHANGE
from worker.broker import PublishNotConfirmed, copy_properties
from worker.outcome import Acked, DeadLetter, Outcome, Retry
from worker.settle import settle


class Recorder:
    """Broker stand-in: logs every confirmed publish (or fails it) in one list."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def publish_confirmed(
        self, body: bytes, properties: dict[str, Any], exchange: str, routing_key: str
    ) -> None:
        self.calls.append(("publish", body, properties, exchange, routing_key))
        if self.fail:
            raise PublishNotConfirmed(f"{exchange}: connection lost")


class Delivery:
    def __init__(self, recorder: Recorder, properties: dict[str, Any]):
        self.recorder = recorder
        self.body = b'{"v":1}'
        self.properties = properties

    def ack(self) -> None:
        self.recorder.calls.append(("ack",))


PROPERTIES = {
    "message_id": "m-1",
    "content_type": "application/json",
    "timestamp": 1700000000,
    "correlation_id": None,  # absent values are not copied
    "priority": 5,  # nor properties we do not carry over
    "application_headers": {"old": "x"},
}


def run(recorder: Recorder, outcome: Outcome) -> None:
    settle(recorder, Delivery(recorder, dict(PROPERTIES)), outcome)  # type: ignore[arg-type]


def test_an_ack_outcome_only_acks() -> None:
    recorder = Recorder()
    run(recorder, Acked())
    assert recorder.calls == [("ack",)]


@pytest.mark.parametrize(
    ("outcome", "exchange", "routing_key"),
    [
        (Retry("5m", "timeout", {"h": 1}), RETRY_EXCHANGE, "5m"),
        (DeadLetter("auth", {"h": 1}), DLX_EXCHANGE, ""),
    ],
)
def test_retry_and_dead_letter_are_confirmed_before_the_ack(
    outcome: Outcome, exchange: str, routing_key: str
) -> None:
    recorder = Recorder()
    run(recorder, outcome)
    assert [c[0] for c in recorder.calls] == ["publish", "ack"]
    _, body, properties, sent_exchange, sent_key = recorder.calls[0]
    assert (sent_exchange, sent_key) == (exchange, routing_key)
    assert body == b'{"v":1}'
    assert properties["message_id"] == "m-1"
    assert properties["delivery_mode"] == 2
    assert properties["application_headers"] == {"h": 1}
    assert "priority" not in properties


def test_a_failed_publish_raises_and_leaves_the_original_unacked() -> None:
    recorder = Recorder(fail=True)
    with pytest.raises(PublishNotConfirmed) as info:
        run(recorder, DeadLetter("auth", {"h": 1}))
    assert "clusteralert.dlx" in str(info.value)
    assert ("ack",) not in recorder.calls


def test_copy_properties_keeps_identity_and_makes_it_persistent() -> None:
    copied = copy_properties(dict(PROPERTIES), {"new": 1})
    assert copied == {
        "message_id": "m-1",
        "content_type": "application/json",
        "timestamp": 1700000000,
        "delivery_mode": 2,
        "application_headers": {"new": 1},
    }
