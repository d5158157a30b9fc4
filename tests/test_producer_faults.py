"""The node agent on bad days, with the real ``clusteralert-producer run`` process and the
real RabbitMQ: the broker going away during a burst, a kill -9 in the middle of a
backlog, and two agents on one spool."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

from producer.cli import main as producer_main
from producer.spool import Spool
from shared.config import parse_config
from shared.event import encode_event, new_event
from tests.conftest import (
    BIN,
    RABBIT_HOST,
    RABBIT_PORT,
    Process,
    amqp_url,
    free_port,
    scrape,
    wait_metric,
)
from tests.pipeline import emit, run_cli, set_queue_policy, take_messages
from tests.tcpproxy import TcpProxy
from tests.waiting import wait_until
from worker.broker import connect_any, declare_topology

pytestmark = pytest.mark.integration

Processes = Callable[..., Process]


@pytest.fixture
def node(tmp_path: Path, vhost: str) -> Iterator[tuple[Path, int]]:
    """A config for a node agent on ``vhost`` with a declared topology and no worker.
    No heartbeats: these tests count the messages on the queue."""
    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[broker]\nurls = ["{amqp_url(vhost)}"]\n'
        f'[producer]\nspool_dir = "{tmp_path / "spool"}"\nmetrics_port = {port}\n'
        "heartbeat_interval = 0\n"
    )
    yield config, port


def queued(vhost: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        method = connection.channel().queue_declare("clusteralert.incoming", passive=True).method
        return int(method.message_count)


def drain_ids(vhost: str) -> list[str]:
    return [json.loads(body)["id"] for _, _, body in take_messages(vhost)]


def spool_events(config: Path, count: int) -> list[str]:
    spool = Spool(config.parent / "spool")
    return [
        spool.write(new_event(module="rm", event_id=i, cluster="c", node="n", source="t"))
        .name.split("-", 1)[1]
        .removesuffix(".json")
        for i in range(count)
    ]


def emit_in_process(config: Path, i: int) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = producer_main(
            [
                "emit",
                "--config",
                str(config),
                "--module",
                "rm",
                "--event-id",
                str(i),
                "--param",
                f"n={i}",
            ]
        )
    assert code == 0, f"emit {i} failed"
    return out.getvalue().strip()


def test_broker_stopped_during_a_burst_of_500_emits(
    node: tuple[Path, int], vhost: str, processes: Processes
) -> None:
    config, port = node
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(
        lambda: scrape(port).get("clusteralert_producer_broker_connected") == 1,
        30,
        "the agent connected",
    )
    emitted: list[str] = []
    stopped = False
    try:
        for i in range(500):
            emitted.append(emit_in_process(config, i))
            if i == 99:
                # A fifth of the way in, with the agent already forwarding the burst (and
                # so with publishes in flight), the broker goes away; the rest of the
                # burst arrives while it is down.
                wait_until(
                    lambda: scrape(port).get("clusteralert_producer_published_total", 0) >= 1,
                    30,
                    "the agent forwarding the burst",
                )
                subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
                stopped = True
        wait_until(
            lambda: scrape(port).get("clusteralert_producer_broker_connected") == 0,
            30,
            "the agent to notice",
        )
        # What the broker had not confirmed is still in the spool, with the 400 emitted
        # while it was down.
        assert scrape(port)["clusteralert_spool_events"] >= 400
    finally:
        if stopped:
            subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
    wait_until(lambda: queued(vhost) >= 500, 90, "500 events on the incoming queue")
    wait_until(lambda: scrape(port).get("clusteralert_spool_events") == 0, 30, "spool drained")
    ids = drain_ids(vhost)
    # Each event arrives; one published before the stop but never confirmed may arrive
    # twice (at least once is the promise), never more than a confirm window of them.
    assert set(ids) == set(emitted)
    assert len(ids) - len(set(ids)) <= 256
    assert agent.proc.poll() is None
    assert agent.stop() == 0


def test_kill_9_mid_backlog_loses_nothing(
    node: tuple[Path, int], vhost: str, processes: Processes
) -> None:
    config, _ = node
    spooled = spool_events(config, 5000)
    first = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(lambda: queued(vhost) >= 1000, 60, "part of the backlog forwarded")
    first.kill()
    second = processes("clusteralert-producer", "run", "--config", str(config))
    wait_until(
        lambda: Spool(config.parent / "spool").stats().events == 0,
        90,
        "the spool drained after the restart",
    )
    ids = drain_ids(vhost)
    assert set(ids) == set(spooled)
    duplicates = sum(n - 1 for n in Counter(ids).values())
    print(
        f"\nkill -9 mid-backlog: {len(ids)} messages for {len(spooled)} events, "
        f"{duplicates} duplicates"
    )
    assert duplicates <= 256  # at most one confirm window
    assert second.stop() == 0


def test_two_agents_on_one_spool_never_send_a_file_twice(
    node: tuple[Path, int], vhost: str, processes: Processes
) -> None:
    config, port = node
    # The second agent without the metrics port, which only one process can have.
    second = config.with_name("second.toml")
    second.write_text(config.read_text().replace(f"metrics_port = {port}", ""))
    agents = [
        processes("clusteralert-producer", "run", "--config", str(path))
        for path in (config, second)
    ]
    # Both connected and watching before the first event, so both can take part: a test
    # that let one agent drain the spool alone would not show the claims work.
    for agent in agents:
        wait_until(lambda a=agent: "connected to broker" in a.output(), 30, f"{agent} up")
    spooled = spool_events(config, 2000)
    wait_until(lambda: Spool(config.parent / "spool").stats().events == 0, 90, "drained")
    wait_until(lambda: queued(vhost) >= 2000, 30, "all on the queue")
    ids = drain_ids(vhost)
    assert sorted(ids) == sorted(spooled)  # each exactly once
    shares = []
    for agent in agents:
        assert agent.stop() == 0
        shares.append(agent.output().count("forwarded event"))
    print(f"\ntwo agents forwarded {shares[0]} and {shares[1]} of {len(spooled)}")
    assert sum(shares) == len(spooled)
    # How the work is split depends on timing, but each agent must have done some.
    assert min(shares) > 0, shares


# Root reads every file; without these capabilities it is bound by file modes like the
# agent's own user, while still reaching the interpreter under /root.
WITHOUT_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search"]
WITHOUT_DAC += ["--bounding-set=-dac_override,-dac_read_search", "--"]


def test_an_unreadable_file_is_set_aside_and_holds_up_nothing(
    node: tuple[Path, int], tmp_path: Path, vhost: str
) -> None:
    """A spool file the agent cannot read (another user's, mode 0600; emit by root with
    umask 077 made such files): the agent sets it aside, counts and logs it once, and
    forwards the next event at once instead of retrying the unreadable one forever."""
    config, port = node
    spool = Spool(config.parent / "spool")
    spool.ensure()
    # The oldest in the spool, so the agent meets it first.
    unreadable = spool.directory / f"00000000000000000001-{uuid.uuid4()}.json"
    unreadable.write_bytes(
        encode_event(new_event(module="rm", event_id=1, cluster="c", node="n", source="t"))
    )
    nobody = pwd.getpwnam("nobody")
    os.chown(unreadable, nobody.pw_uid, nobody.pw_gid)
    unreadable.chmod(0o600)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*WITHOUT_DAC, str(BIN / "clusteralert-producer"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Until the agent has dealt with the unreadable file, or (as it did) retried it
        # often enough for its backoff to grow.
        wait_until(
            lambda: (
                scrape(port).get("clusteralert_producer_set_aside_total", 0) >= 1
                or scrape(port).get("clusteralert_producer_held_back_total", 0) >= 5
            ),
            20,
            "the agent meeting the unreadable file",
        )
        started = time.monotonic()
        event_id = emit(config, "--module", "rm", "--event-id", "2")
        wait_until(lambda: queued(vhost) == 1, 2, "the later event forwarded")
        took = time.monotonic() - started
        print(f"\nthe event after an unreadable one was forwarded in {took:.3f} s")
        assert drain_ids(vhost) == [event_id]
        wait_metric(port, "clusteralert_producer_set_aside_total", lambda v: v == 1, 5)
        assert (spool.directory / "rejected" / unreadable.name).exists()
        assert not list(spool.pending())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    output = log.read_text()
    (line,) = [line for line in output.splitlines() if unreadable.name in line]
    assert "cannot be read (Permission denied); moved to" in line


@pytest.fixture
def proxied_node(node: tuple[Path, int], vhost: str) -> Iterator[tuple[Path, int, TcpProxy]]:
    """The node agent's config with the broker reached through a proxy the test can
    break. No heartbeat and a long confirm timeout: the agent must notice only what the
    test does (the cut), not a silence of its own making."""
    config, port = node
    proxy = TcpProxy((RABBIT_HOST, RABBIT_PORT))
    proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
    config.write_text(
        config.read_text()
        .replace(amqp_url(vhost), proxied)
        .replace("[broker]\n", "[broker]\nheartbeat = 0\n")
        + "confirm_timeout = 600\n"
    )
    yield config, port, proxy
    proxy.close()


def test_broker_lost_with_confirms_outstanding_loses_nothing(
    proxied_node: tuple[Path, int, TcpProxy], vhost: str, processes: Processes
) -> None:
    """The link to the broker fails with two kinds of publish unconfirmed: some the broker
    has (their confirms lost on the way back) and some it never got (lost on the way
    there). Both stay in the spool and are sent again once the agent reconnects: the
    first kind arrives twice, the second once, none is lost."""
    config, port, proxy = proxied_node
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    wait_metric(port, "clusteralert_producer_broker_connected", lambda v: v == 1, 30)
    # Both batches fit in the confirm window, so the agent publishes all of them at once.
    proxy.mute()
    reached = spool_events(config, 100)
    wait_until(lambda: queued(vhost) == len(reached), 30, "the first batch on the queue")
    proxy.drop()
    lost = spool_events(config, 100)
    wait_until(
        lambda: all(i.encode() in b"".join(proxy.dropped) for i in lost),
        30,
        "the second batch published into the dropping link",
    )
    spool = Spool(config.parent / "spool")
    assert spool.stats().events == 200  # all 200 unconfirmed, none deleted
    proxy.restore()
    proxy.cut()
    wait_until(lambda: spool.stats().events == 0, 60, "the spool drained after the cut")
    wait_until(lambda: queued(vhost) >= 300, 30, "every event on the queue")
    counts = Counter(drain_ids(vhost))
    duplicated = {i for i, n in counts.items() if n > 1}
    print(f"\nconfirms outstanding at the cut: {sum(counts.values())} messages for 200 events")
    assert set(counts) == set(reached) | set(lost)
    assert duplicated == set(reached) and max(counts.values()) == 2
    assert "broker connection lost" in agent.output()
    assert agent.stop() == 0


def producer_status(config: Path) -> dict[str, object]:
    result = run_cli("clusteralert-producer", "status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def clear_queue_policy(vhost: str, name: str) -> None:
    subprocess.run(
        ["rabbitmqctl", "-q", "clear_policy", "-p", vhost, name],
        check=True,
        capture_output=True,
        timeout=60,
    )


def refuse_publishes(vhost: str, max_length: int) -> None:
    """A length limit on the incoming queue (which overflows with reject-publish), in
    force once this returns: a quorum queue takes a policy on a little after
    ``set_policy`` answers, so probes are published until one is nacked, then purged."""
    set_queue_policy(vhost, "limit", r"^clusteralert\.incoming$", {"max-length": max_length})
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        channel.confirm_delivery()

        def nacked() -> bool:
            try:
                channel.basic_publish("", "clusteralert.incoming", b"probe")
            except pika.exceptions.NackError:
                return True
            return False

        wait_until(nacked, 30, "the queue's length limit in force")
        channel.queue_purge("clusteralert.incoming")


def test_events_the_broker_nacks_stay_in_the_spool_until_it_takes_them(
    node: tuple[Path, int], vhost: str, processes: Processes
) -> None:
    """The broker refuses the events (its queue's length limit with reject-publish: a
    nack for each): they stay in the spool, the agent says so, ``status`` shows it, and
    once the limit is lifted every one arrives, once."""
    config, port = node
    # A quorum queue's limit is soft: it tells a publisher to stop only after the
    # publishes that took it past the limit, and the agent has a window of them in
    # flight; more events than that, so that some are certainly refused.
    refuse_publishes(vhost, 0)
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    spooled = spool_events(config, 600)
    wait_metric(port, "clusteralert_producer_held_back_total", lambda v: v >= 1, 30)
    report = producer_status(config)
    print(f"\nstatus with the broker refusing: {report}")
    assert "broker refused event" in str(report["last_error"])
    # The agent goes on trying while status is read, and a published file leaves the
    # spool only after its confirm: what status counted and what the queue holds a moment
    # later cover every event (none lost), and some are certainly still waiting.
    assert isinstance(report["events"], int) and report["events"] > 0
    assert report["events"] + queued(vhost) >= len(spooled)
    clear_queue_policy(vhost, "limit")
    wait_until(lambda: Spool(config.parent / "spool").stats().events == 0, 60, "spool drained")
    ids = drain_ids(vhost)
    assert sorted(ids) == sorted(spooled)  # each once: a nacked publish is not enqueued
    # Hundreds of events were refused; the agent says so once per attempt (a few, with
    # backoff), not once per event.
    refusals = [line for line in agent.output().splitlines() if "broker refused" in line]
    print(f"{len(refusals)} refusal lines")
    assert 1 <= len(refusals) <= 10
    assert agent.stop() == 0


def test_a_full_queue_holds_the_backlog_until_space_frees(
    node: tuple[Path, int], vhost: str, processes: Processes
) -> None:
    """The incoming queue at its length limit (no worker consuming, say): the backlog
    waits in the spool and ``status`` says why; as soon as something takes messages off
    the queue the agent sends the rest, in as many rounds as space allows, none lost."""
    config, port = node
    refuse_publishes(vhost, 100)
    agent = processes("clusteralert-producer", "run", "--config", str(config))
    spooled = spool_events(config, 1000)
    wait_metric(port, "clusteralert_producer_held_back_total", lambda v: v >= 1, 30)
    result = run_cli("clusteralert-producer", "status", "--config", str(config))
    print(f"\n{result.stdout}")
    assert result.returncode == 0, result.stderr
    assert "last error:     broker refused event" in result.stdout
    waiting = int(re.findall(r"^events waiting: (\d+) ", result.stdout, re.M)[0])
    assert waiting > 0
    taken: Counter[str] = Counter()

    def make_room() -> bool:
        taken.update(drain_ids(vhost))
        return set(taken) == set(spooled)

    wait_until(make_room, 120, "every event taken off the queue", interval=0.2)
    wait_until(lambda: Spool(config.parent / "spool").stats().events == 0, 30, "spool drained")
    print(f"{waiting} events waited for room; {taken.total()} messages for {len(spooled)}")
    assert taken.total() == len(spooled)  # a refused publish is not enqueued: no duplicates
    assert producer_status(config)["events"] == 0
    assert agent.stop() == 0
