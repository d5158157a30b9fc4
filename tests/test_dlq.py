"""``clusteralert-worker dlq`` against a real RabbitMQ: browsing under a delivery limit,
naive times, a purge prompt that outlasts heartbeats, bounded memory, brokers that do
not answer, and dead letters crafted to drive the operator's terminal."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import amqp
import pytest

from shared.topology import DEAD_QUEUE, DLX_EXCHANGE, WORK_QUEUE
from tests.conftest import BIN, RABBIT_HOST, RABBIT_PORT, Certs, Process
from tests.pipeline import (
    SMTP_PASSWORD,
    dlq,
    dlq_list,
    received_ids,
    start_worker,
    take_messages,
    write_config,
)
from tests.smtpserver import SmtpServer
from tests.tcpproxy import TcpProxy
from tests.waiting import wait_until
from worker.broker import declare_topology
from worker.retry_policy import HEADER_ATTEMPTS, HEADER_LAST_ERROR, HEADER_REASON

pytestmark = pytest.mark.integration

# Anything a terminal may act on: C0 (newline aside), DEL and C1.
_TERMINAL_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _connection(vhost: str) -> amqp.Connection:
    connection = amqp.Connection(
        f"{RABBIT_HOST}:{RABBIT_PORT}", userid="guest", password="guest", virtual_host=vhost
    )
    connection.connect()
    return connection


def seed(
    vhost: str,
    count: int,
    *,
    time: str | None = None,
    node: str = "n1",
    reason: str = "tls_refused",
    last_error: str = "relay said no",
    padding: int = 0,
) -> list[str]:
    """Declare the topology and dead-letter ``count`` events the way the worker does
    (through the DLX, with its failure headers). Returns their ids in queue order."""
    ids = []
    connection = _connection(vhost)
    try:
        channel = connection.channel()
        declare_topology(channel)
        channel.confirm_select()
        for i in range(count):
            event_id = str(uuid.uuid4())
            doc = {
                "v": 1,
                "id": event_id,
                "time": time or datetime.now(UTC).isoformat(),
                "cluster": "c",
                "node": node,
                "module": "node",
                "event_id": 1,
                "params": {"server": f"srv{i}", "pad": "x" * padding},
                "source": "test",
            }
            headers = {HEADER_REASON: reason, HEADER_ATTEMPTS: 1, HEADER_LAST_ERROR: last_error}
            message = amqp.Message(
                json.dumps(doc).encode(),
                delivery_mode=2,
                message_id=event_id,
                content_type="application/json",
                application_headers=headers,
            )
            channel.basic_publish_confirm(message, exchange=DLX_EXCHANGE, routing_key="")
            ids.append(event_id)
    finally:
        connection.close()
    return ids


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return result.stdout


def limit_dlq_deliveries(vhost: str) -> None:
    """What RabbitMQ 4 does by default: a delivery limit of 20 on every quorum queue."""
    rabbitmqctl(
        "set_policy", "-p", vhost, "dlq-limit", "^clusteralert\\.dead$",
        '{"delivery-limit":20}', "--apply-to", "queues",
    )  # fmt: skip
    wait_until(
        lambda: "dlq-limit" in rabbitmqctl("list_queues", "-p", vhost, "name", "policy"),
        10,
        "the policy to apply",
    )


def queue_depth(vhost: str, queue: str) -> int:
    connection = _connection(vhost)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).message_count)
    finally:
        connection.close()


def test_browsing_under_a_delivery_limit_keeps_every_dead_letter_and_replay_works(
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    ids = seed(vhost, 3)
    limit_dlq_deliveries(vhost)
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    config = write_config(tmp_path, vhost, [relay], certs)
    started = time.monotonic()
    for browse in range(50):
        if browse % 10 == 9:
            shown = dlq(config, "show", ids[1])
            assert shown.returncode == 0, (browse, shown.stderr)
            assert json.loads(shown.stdout)["id"] == ids[1]
        else:
            # Every dead letter is still there, in the order it arrived.
            assert [r["id"] for r in dlq_list(config)] == ids, browse
    elapsed = time.monotonic() - started
    assert elapsed < 50, f"50 browses took {elapsed:.1f}s"
    # Each browse leaves fresh copies: nothing creeps towards the limit.
    connection = _connection(vhost)
    try:
        message = connection.channel().basic_get(DEAD_QUEUE, no_ack=False)
        assert message is not None
        assert message.headers.get("x-delivery-count", 0) == 0
        assert message.headers[HEADER_REASON] == "tls_refused"
    finally:
        connection.close()  # gives it back once, well under the limit
    assert queue_depth(vhost, DEAD_QUEUE) == 3

    start_worker(processes, config)
    replay = dlq(config, "replay", "--reason", "tls_refused")
    assert replay.returncode == 0, replay.stderr
    # One line: progress with carriage returns is for a terminal only.
    assert replay.stderr == "replayed 3 dead letter(s)\n"
    assert relay.wait_for(lambda got: len(got) >= 3, timeout=30)
    assert sorted(received_ids(relay)) == sorted(ids)
    assert dlq_list(config) == []


def test_since_takes_dead_letters_whose_time_has_no_offset_as_utc(
    tmp_path: Path, vhost: str, certs: Certs
) -> None:
    [naive] = seed(vhost, 1, time="2020-01-01T10:00:00")
    [recent] = seed(vhost, 1)
    config = write_config(tmp_path, vhost, [], certs)
    listed = dlq(config, "list", "--json", "--since", "2019-12-31T23:00:00-12:00")
    assert listed.returncode == 0, listed.stderr
    assert "Traceback" not in listed.stderr
    # 2020-01-01T10:00 UTC is before 2020-01-01T11:00 UTC (= 23:00 at -12:00).
    assert [r["id"] for r in json.loads(listed.stdout)] == [recent]
    earlier = dlq(config, "list", "--json", "--since", "2020-01-01T09:00:00Z")
    assert [r["id"] for r in json.loads(earlier.stdout)] == [naive, recent]


def test_an_id_that_is_no_uuid_is_refused_and_an_uppercase_one_matches(
    tmp_path: Path, vhost: str, certs: Certs
) -> None:
    [one] = seed(vhost, 1)
    config = write_config(tmp_path, vhost, [], certs)
    for command in (("list", "--id", "not-a-uuid"), ("show", "not-a-uuid")):
        refused = dlq(config, *command)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.splitlines()[-1].endswith("not an event UUID: 'not-a-uuid'")
    listed = dlq(config, "list", "--json", "--id", one.upper())
    assert [r["id"] for r in json.loads(listed.stdout)] == [one]
    assert dlq(config, "show", one.upper()).returncode == 0


def _connections(vhost: str) -> int:
    return rabbitmqctl("list_connections", "vhost").split().count(vhost)


def test_purge_prompt_outlasts_the_heartbeat(tmp_path: Path, vhost: str, certs: Certs) -> None:
    first, *rest = seed(vhost, 3)
    config = write_config(tmp_path, vhost, [], certs, broker_extra="heartbeat = 1")
    purge = subprocess.Popen(
        [str(BIN / "clusteralert-worker"), "dlq", "purge", "--id", first, "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert purge.stdout is not None and purge.stdin is not None
        assert first in purge.stdout.readline()
        # The operator thinks for longer than the broker waits for a silent client (two
        # heartbeats): a connection held open while asking is gone by then.
        wait_until(lambda: _connections(vhost) == 0, 20, "no connection while it asks")
        _, stderr = purge.communicate("y\n", timeout=30)
    finally:
        purge.kill()
    assert purge.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "purged 1 dead letter(s)" in stderr
    assert sorted(r["id"] for r in dlq_list(config)) == sorted(rest)


def _peak_rss_kib(*args: str) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run the CLI under a parent of its own that reports the child's peak RSS."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " r.returncode, r.stdout, r.stderr]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, str(BIN / "clusteralert-worker"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    peak, code, out, err = json.loads(result.stdout)
    return peak, subprocess.CompletedProcess(args, code, out, err)


def test_purge_streams_in_bounded_memory(tmp_path: Path, vhost: str, certs: Certs) -> None:
    config = write_config(tmp_path, vhost, [], certs)
    seed(vhost, 1)
    baseline, _ = _peak_rss_kib("dlq", "purge", "--yes", "--config", str(config))
    count, size = 300, 100_000  # 30 MB of dead letters
    seed(vhost, count, padding=size)
    peak, purged = _peak_rss_kib("dlq", "purge", "--yes", "--config", str(config))
    assert purged.returncode == 0, purged.stderr
    assert f"purged {count} dead letter(s)" in purged.stderr
    # Peak RSS in KiB: what it holds must not grow with the dead letters it purges.
    assert (peak - baseline) * 1024 < count * size / 4, (baseline, peak)
    wait_until(lambda: queue_depth(vhost, DEAD_QUEUE) == 0, 15, "the acks to apply")


class _Stall:
    """A TCP proxy to the broker that relays faithfully until the client asks for
    something (any ``queue.declare``); from then on the broker's answers go nowhere."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        self.stalled = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection((RABBIT_HOST, RABBIT_PORT))
            self._sockets += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        seen = b""
        while data := _recv(client):
            seen += data
            # queue.declare is class 50, method 10 in a method frame (type 1).
            if re.search(b"\x01..[\x00-\xff]{4}\x00\x32\x00\x0a", seen[8:], re.S):
                self.stalled.set()
            upstream.sendall(data)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        while data := _recv(upstream):
            if not self.stalled.is_set():
                client.sendall(data)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.fixture
def stall() -> Iterator[_Stall]:
    proxy = _Stall()
    yield proxy
    proxy.close()


@pytest.mark.parametrize("broker", ["silent", "stalls"])
def test_a_broker_that_does_not_answer_gives_one_line_within_a_bound(
    broker: str, tmp_path: Path, vhost: str, certs: Certs, stall: _Stall
) -> None:
    seed(vhost, 2)
    # A silent broker takes the TCP connection and never says a word.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1] if broker == "silent" else stall.port
    config = write_config(tmp_path, vhost, [], certs, broker_extra="connect_timeout = 1")
    text = config.read_text().replace(f":{RABBIT_PORT}/", f":{port}/")
    config.write_text(text)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [str(BIN / "clusteralert-worker"), "dlq", "list", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("dlq list hung on a broker that does not answer")
    finally:
        listener.close()
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "timed out" in result.stderr, result.stderr
    assert elapsed < 5, elapsed  # connect_timeout is 1 s
    if broker == "stalls":
        assert stall.stalled.is_set()
    # Whatever it had taken goes back: nothing lost.
    wait_until(lambda: queue_depth(vhost, DEAD_QUEUE) == 2, 15, "both dead letters back")


def test_control_characters_in_dead_letters_are_shown_escaped(
    tmp_path: Path, vhost: str, certs: Certs
) -> None:
    spoof = "n1\x1b[2K\r\x1b[32mall clear\x1b[0m\r\nfake\x9b31m\x7f"
    [event_id] = seed(vhost, 1, node=spoof, reason="tls\x1b]0;x\x07", last_error="a\r\nb\x1b[1A")
    config = write_config(tmp_path, vhost, [], certs)
    outputs = {
        "table": dlq(config, "list"),
        "json": dlq(config, "list", "--json"),
        "show": dlq(config, "show", event_id),
        "replay": dlq(config, "replay", "--dry-run"),
        "purge": dlq(config, "purge", "--dry-run"),
    }
    for name, result in outputs.items():
        assert result.returncode == 0, (name, result.stderr)
        for text in (result.stdout, result.stderr):
            assert not _TERMINAL_CONTROL.search(text), (name, text)
    table = outputs["table"].stdout.splitlines()
    assert len(table) == 2, table  # header and one row: no injected lines
    assert "\\x1b[32mall clear" in table[1] and "\\r\\n" in table[1]
    for name in ("json", "show"):
        doc = json.loads(outputs[name].stdout)
        row = doc[0] if isinstance(doc, list) else doc
        assert row["node"] == spoof  # JSON escapes them, and still says what was there
    assert len(outputs["replay"].stdout.splitlines()) == 1
    assert queue_depth(vhost, DEAD_QUEUE) == 1
    assert queue_depth(vhost, WORK_QUEUE) == 0


def _peek(vhost: str) -> tuple[bytes, dict[str, object]]:
    """The head of the DLQ, given back at once (one delivery, far below any limit)."""
    connection = _connection(vhost)
    try:
        message = connection.channel().basic_get(DEAD_QUEUE, no_ack=False)
        assert message is not None
        properties = dict(message.properties)
        headers = dict(properties.pop("application_headers"))
        headers.pop("x-delivery-count", None)
        return message.body, {**properties, "headers": headers}
    finally:
        connection.close()


def test_a_browsed_dead_letter_is_kept_identical(tmp_path: Path, vhost: str, certs: Certs) -> None:
    seed(vhost, 0)
    connection = _connection(vhost)
    try:
        channel = connection.channel()
        # Dead-lettered by the broker itself, so it carries a real x-death history.
        channel.queue_declare(
            "expiring",
            durable=True,
            auto_delete=False,
            arguments={"x-message-ttl": 0, "x-dead-letter-exchange": DLX_EXCHANGE},
        )
        channel.confirm_select()
        message = amqp.Message(
            b"\x00\xffnot json",
            delivery_mode=2,
            priority=3,
            message_id="m-1",
            correlation_id="c-1",
            reply_to="nowhere",
            type="alert",
            app_id="elsewhere",
            content_type="application/octet-stream",
            content_encoding="binary",
            timestamp=1_767_322_800,
            application_headers={"nested": {"a": [1, "two", 3.5, True]}, "n": -7},
        )
        channel.basic_publish_confirm(message, exchange="", routing_key="expiring")
    finally:
        connection.close()
    wait_until(lambda: queue_depth(vhost, DEAD_QUEUE) == 1, 10, "the broker to dead-letter it")
    before = _peek(vhost)
    assert "x-death" in before[1]["headers"]  # type: ignore[operator]
    config = write_config(tmp_path, vhost, [], certs)
    for _ in range(2):
        assert len(dlq_list(config)) == 1
    assert _peek(vhost) == before


# A basic.get method frame: type 1, channel, size, then class 60 method 70.
_BASIC_GET = re.compile(b"\x01..[\x00-\xff]{4}\x00\x3c\x00\x46", re.S)


def _nth_get(n: int) -> Callable[[bytes], bool]:
    """True for the chunk that carries the client's ``n``-th basic.get."""
    seen = 0
    tail = b""

    def trip(chunk: bytes) -> bool:
        nonlocal seen, tail
        # A frame split across two chunks is still counted once: the tail is too short
        # to hold a whole one.
        window = tail + chunk
        seen += len(_BASIC_GET.findall(window)) - len(_BASIC_GET.findall(tail))
        tail = window[-10:]
        return seen >= n

    return trip


def _ready_ids(vhost: str, queue: str) -> list[str]:
    """Every id on ``queue``, once nothing on it is left unacknowledged, taken off it."""
    wait_until(
        lambda: re.search(
            rf"^{re.escape(queue)}\t\d+\t0$",
            rabbitmqctl("list_queues", "-p", vhost, "name", "messages_ready",
                        "messages_unacknowledged"),
            re.M,
        ),
        30,
        f"what the killed command held back on {queue}",
    )  # fmt: skip
    return [props.message_id for _, props, _ in take_messages(vhost, queue)]


@pytest.mark.parametrize("command", ["replay", "list"])
def test_a_dlq_command_killed_midway_leaves_every_dead_letter_somewhere(
    command: str,
    tmp_path: Path,
    vhost: str,
    certs: Certs,
    processes: Callable[..., Process],
) -> None:
    """kill -9 in the middle of a large replay or browse: each dead letter is still in the
    DLQ, or (replay) on the work queue, or both; never neither. The command is frozen at
    an exact point (the broker's answer to its 600th get never reaches it), so a few
    batches are settled, some copies are unconfirmed and one message is in its hands."""
    ids = seed(vhost, 2000)
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    config = write_config(tmp_path, vhost, [], certs)
    config.write_text(
        config.read_text().replace(f"{RABBIT_HOST}:{RABBIT_PORT}", f"127.0.0.1:{proxy.port}")
    )
    try:
        proxy.mute_when(_nth_get(600))
        dlq_command = processes("clusteralert-worker", "dlq", command, "--config", str(config))
        assert proxy.tripped.wait(60), dlq_command.output()
        dlq_command.kill()
        dead = _ready_ids(vhost, DEAD_QUEUE)
        moved = _ready_ids(vhost, WORK_QUEUE)
    finally:
        proxy.close()
    found = Counter(dead + moved)
    duplicates = found.total() - len(ids)
    print(
        f"\n{command} killed at its 600th get: {len(dead)} in the DLQ, {len(moved)} on the "
        f"work queue, {duplicates} duplicates"
    )
    assert set(found) == set(ids)
    assert duplicates <= 256  # at most one confirm batch
    if command == "replay":
        # The copies of the first 599 were all published before the 600th get was sent.
        assert set(moved) == set(ids[:599]) and set(ids[599:]) <= set(dead)
    else:
        assert moved == []
