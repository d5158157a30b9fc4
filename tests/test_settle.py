"""The settle stage (unit level, with a recording stand-in for the broker connection):
the original is acked only after its retry or dead letter was confirmed, with the
message's identity and the new headers, and never when the publish failed."""

from __future__ import annotations

from typing import Any

import pytest

from shared.topology import DLX_EXCHANGE, RETRY_EXCHANGE
from worker.pipeline import Outcome
from worker.settle import CONFIRM_TIMEOUT, SettleError, Settler, copy_properties


class Recorder:
    """Broker stand-in: a connection whose channels log every call in one list."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail
        self.channels = 0

    def channel(self) -> Channel:
        self.channels += 1
        return Channel(self)


class Channel:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.is_open = True

    def confirm_select(self) -> None:
        self.recorder.calls.append(("confirm_select",))

    def basic_publish_confirm(self, message: Any, **kwargs: Any) -> None:
        self.recorder.calls.append(("publish", message, kwargs))
        if self.recorder.fail:
            self.is_open = False
            raise OSError("connection lost")


class Message:
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


def test_an_ack_outcome_only_acks() -> None:
    recorder = Recorder()
    Settler(recorder).settle(Message(recorder, dict(PROPERTIES)), Outcome("ack"))
    assert recorder.calls == [("ack",)]
    assert recorder.channels == 0


@pytest.mark.parametrize(
    ("outcome", "exchange", "routing_key"),
    [
        (Outcome("retry", "timeout", "5m", {"h": 1}), RETRY_EXCHANGE, "5m"),
        (Outcome("dead_letter", "auth", None, {"h": 1}), DLX_EXCHANGE, ""),
    ],
)
def test_retry_and_dead_letter_are_confirmed_before_the_ack(
    outcome: Outcome, exchange: str, routing_key: str
) -> None:
    recorder = Recorder()
    Settler(recorder).settle(Message(recorder, dict(PROPERTIES)), outcome)
    assert [c[0] for c in recorder.calls] == ["confirm_select", "publish", "ack"]
    _, message, kwargs = recorder.calls[1]
    assert kwargs == {
        "exchange": exchange,
        "routing_key": routing_key,
        "mandatory": True,
        "confirm_timeout": CONFIRM_TIMEOUT,
    }
    assert message.body == b'{"v":1}'
    assert message.properties["message_id"] == "m-1"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["application_headers"] == {"h": 1}
    assert "priority" not in message.properties


def test_a_failed_publish_raises_and_leaves_the_original_unacked() -> None:
    recorder = Recorder(fail=True)
    settler = Settler(recorder)
    outcome = Outcome("dead_letter", "auth", None, {"h": 1})
    with pytest.raises(SettleError) as info:
        settler.settle(Message(recorder, dict(PROPERTIES)), outcome)
    assert "clusteralert.dlx" in str(info.value) and "connection lost" in str(info.value)
    assert ("ack",) not in recorder.calls
    # The broken channel is not reused: the next settle opens a new one.
    recorder.fail = False
    settler.settle(Message(recorder, dict(PROPERTIES)), outcome)
    assert recorder.channels == 2
    assert recorder.calls[-1] == ("ack",)


def test_one_confirm_channel_serves_many_settles() -> None:
    recorder = Recorder()
    settler = Settler(recorder)
    for _ in range(3):
        settler.settle(Message(recorder, dict(PROPERTIES)), Outcome("retry", "x", "30s", {}))
    assert recorder.channels == 1
    assert [c[0] for c in recorder.calls].count("confirm_select") == 1


def test_copy_properties_keeps_identity_and_makes_it_persistent() -> None:
    copied = copy_properties(dict(PROPERTIES), {"new": 1})
    assert copied == {
        "message_id": "m-1",
        "content_type": "application/json",
        "timestamp": 1700000000,
        "delivery_mode": 2,
        "application_headers": {"new": 1},
    }
