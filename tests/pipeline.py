"""Helpers for tests that run the real pipeline: a config file for a vhost and relays,
the worker and CLI commands started as users start them, and events published fast."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika

from shared.event import routing_key
from shared.own_events import heartbeat_event
from tests.conftest import BIN, Certs, Process, amqp_url, free_port, wait_metric
from tests.smtpserver import Received, SmtpServer

SMTP_PASSWORD = "relay-secret-7f3a"
# The routing key of every node heartbeat begins so ({module}.{event_id}.).
_HEARTBEAT_KEY = routing_key(heartbeat_event("c", "n", 60)).rsplit(".", 1)[0] + "."


def write_config(
    tmp_path: Path,
    vhost: str,
    relays: Sequence[SmtpServer],
    certs: Certs,
    *,
    auth: bool = True,
    charset: str = "utf-8",
    extra: str = "",
    broker_extra: str = "",
    name: str = "clusteralert.toml",
    incident: str = "group_wait = 0\nstorm_threshold = 0",
) -> Path:
    """A config for ``vhost`` with the given relays in order. Secrets go in files.
    ``incident`` is the ``[incident]`` table: by default one mail per event, at once,
    as before incidents existed (the delivery tests are about delivery, not grouping)."""
    (tmp_path / "smtp_password").write_text(SMTP_PASSWORD + "\n")
    (tmp_path / "amqp_password").write_text("guest\n")
    smtp = ""
    for relay in relays:
        security = {"plain": "none"}.get(relay.mode, relay.mode)
        smtp += f"""
[[smtp]]
host = "127.0.0.1"
port = {relay.port}
security = "{security}"
ca_file = "{certs.ca_file}"
timeout = 10
"""
        if auth:
            smtp += 'username = "alert"\npassword_file = "smtp_password"\n'
    config = tmp_path / name
    config.write_text(f"""
[broker]
urls = ["{amqp_url(vhost, password=False)}"]
password_file = "amqp_password"
{broker_extra}

[producer]
spool_dir = "spool"
cluster = "prod-cluster"

[mail]
from = "cluster@example.com"
to = ["ops@example.com", "oncall@example.com"]
charset = "{charset}"
{smtp}
{extra}

[incident]
{incident}
""")
    return config


def start_worker(
    processes: Callable[..., Process], config: Path, *options: str
) -> tuple[Process, int]:
    """``clusteralert-worker run`` as the README says, ready once it is consuming."""
    port = free_port()
    worker = processes(
        "clusteralert-worker", "run", "--config", str(config), "--metrics-port", str(port), *options
    )
    wait_metric(port, "clusteralert_broker_connected", lambda v: v == 1, 30)
    return worker, port


def run_cli(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin if stdin is not None else "",
    )


def emit(config: Path, *args: str) -> str:
    result = run_cli("clusteralert-producer", "emit", "--config", str(config), *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def dlq(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("clusteralert-worker", "dlq", *args, "--config", str(config), stdin=stdin)


def dlq_list(config: Path) -> list[dict[str, object]]:
    result = dlq(config, "list", "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def publish_events(
    vhost: str,
    count: int,
    module: str = "node",
    event_id: int = 1,
    age: timedelta = timedelta(0),
) -> list[str]:
    """Publish ``count`` valid events straight to the exchange, with confirms: a load
    test needs hundreds, far faster than as many ``emit`` processes. ``age`` dates the
    events that long ago."""
    ids = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(count):
            event_uuid = str(uuid.uuid4())
            body = json.dumps(
                {
                    "v": 1,
                    "id": event_uuid,
                    "time": (datetime.now(UTC) - age).isoformat(),
                    "cluster": "c",
                    "node": f"n{i % 7}",
                    "module": module,
                    "event_id": event_id,
                    "params": {"server": f"srv{i}"},
                    "source": "test",
                }
            ).encode()
            channel.basic_publish(
                "clusteralert.events",
                f"{module}.{event_id}.n",
                body,
                mandatory=True,
                properties=pika.BasicProperties(delivery_mode=2, message_id=event_uuid),
            )
            ids.append(event_uuid)
    return ids


def queue_depth(vhost: str, queue: str = "clusteralert.mail") -> int:
    """Messages ready on ``queue``. Unacked ones count only once their consumer is gone,
    so call it after stopping the worker to see what it left behind."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        method = connection.channel().queue_declare(queue, passive=True).method
        return int(method.message_count)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def plain_body(mail: Received) -> str:
    """The text part of a mail, decoded."""
    part = mail.parsed().get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def body_ids(mail: Received) -> set[str]:
    """Every event id a mail's text names: one for a single event, each incident's for a
    digest."""
    return set(_UUID.findall(plain_body(mail)))


def received_ids(received: SmtpServer | Sequence[Received]) -> list[str]:
    """The event id of every mail the relay took, duplicates included."""
    mails = received.received if isinstance(received, SmtpServer) else received
    return [m.event_id for m in mails]


def take_messages(
    vhost: str, queue: str = "clusteralert.incoming"
) -> list[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]]:
    """Every message ready on ``queue`` now, taken off it (acked). With a consumer, not
    basic.get: RabbitMQ refuses basic.get on a single-active-consumer quorum queue such as
    clusteralert.incoming. Messages that arrive meanwhile stay on the queue. Node agents'
    heartbeats are taken off too but not returned: the tests that read events here are
    about the events."""
    taken: list[tuple[pika.spec.Basic.Deliver, pika.BasicProperties, bytes]] = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        ready = int(channel.queue_declare(queue, passive=True).method.message_count)
        if ready == 0:
            return taken
        for method, properties, body in channel.consume(queue, inactivity_timeout=30):
            assert method is not None, f"only {len(taken)} of {ready} messages came"
            channel.basic_ack(method.delivery_tag)
            taken.append((method, properties, body))
            if len(taken) == ready:
                break
        channel.cancel()  # returns what was delivered beyond them, unacked
    return [m for m in taken if not m[0].routing_key.startswith(_HEARTBEAT_KEY)]


def set_queue_policy(vhost: str, name: str, pattern: str, definition: dict[str, object]) -> None:
    """A RabbitMQ policy on ``vhost``'s queues matching ``pattern``, as an operator (or
    RabbitMQ 4's defaults) might set: tests use them to shorten or break the topology
    without changing what the worker declares."""
    subprocess.run(
        [
            "rabbitmqctl", "-q", "set_policy", "-p", vhost, "--apply-to", "queues",
            name, pattern, json.dumps(definition),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


def short_rungs(vhost: str, ttl_ms: int = 200) -> None:
    """The ladder's rungs wait 30 s and more. A policy with a lower message-ttl on this
    vhost's retry queues makes them quick: the broker uses the lower of policy and
    queue argument, so the worker still declares its own topology unchanged."""
    set_queue_policy(vhost, "short-rungs", r"^clusteralert\.retry\.", {"message-ttl": ttl_ms})
