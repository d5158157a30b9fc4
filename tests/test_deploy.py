"""The deploy files are right by construction: compose validated against the Compose
Specification, the broker's definitions equal to the topology in shared/, Prometheus
config and rules checked by promtool, and every metric the dashboard and the rules use
exported by a real worker. No Docker engine runs here, so these are the checks we have."""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from shared.config import parse_config
from shared.event import encode_event, new_event, routing_key
from shared.own_events import canary_event, heartbeat_event, probe_event
from shared.topology import (
    BINDINGS,
    DEAD_QUEUE,
    DLX_EXCHANGE,
    EVENTS_EXCHANGE,
    EXCHANGES,
    INCOMING_QUEUE,
    QUEUES,
    RETRY_DELAYS,
    RETRY_EXCHANGE,
    SILENCES_STREAM,
    UNBINDINGS,
    WORK_QUEUE,
    retry_queue_name,
)
from tests.conftest import BIN, Certs, Process, amqp_url, free_port, scrape, wait_metric
from tests.pipeline import dlq, emit, publish_events, start_worker, write_config
from tests.prometheus import start_prometheus
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clusteralert.json"
RULES = DEPLOY / "prometheus" / "rules.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
    return path


def test_compose_file_follows_the_compose_specification() -> None:
    text = COMPOSE.read_text()
    PyCompose.from_yaml(text).validate()
    # The parser is strict: a typo is an error, not an ignored key.
    typo = text.replace("stop_grace_period:", "stop_grace_periode:", 1)
    with pytest.raises(Exception, match="stop_grace_periode"):
        PyCompose.from_yaml(typo).validate()


def test_scaled_workers_do_not_collide() -> None:
    worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    assert "ports" not in worker and "container_name" not in worker


def _clusteralert_commands() -> list[list[str]]:
    """Every clusteralert command line the compose services run."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    commands = []
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        if service.get("image") != "clusteralert:dev":
            continue
        command = service.get("command", [])
        if service.get("entrypoint") == ["sh", "-c"]:
            # The shell's own words (tests, groups) are not commands of ours.
            for part in re.split(r"&&|\|\||;|\bexec |[{}]", " ".join(command)):
                words = shlex.split(part)
                if words and words[0].startswith("clusteralert-"):
                    commands.append(words)
        else:
            commands.append([*entrypoint, *command])
    return commands


def test_every_command_is_a_real_console_script_with_valid_arguments() -> None:
    from producer.cli import _parser as producer_parser
    from worker.cli import _parser as worker_parser

    parsers = {"clusteralert-producer": producer_parser, "clusteralert-worker": worker_parser}
    commands = _clusteralert_commands()
    assert {c[0] for c in commands} == {"clusteralert-producer", "clusteralert-worker"}
    for words in commands:
        assert words[0] in SCRIPTS, words
        parsers[words[0]]().parse_args(words[1:])  # exits (fails the test) on a bad option


def test_env_vars_and_config_keys_exist_in_our_config_model(tmp_path: Path) -> None:
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        for name in service.get("environment", {}):
            if name.startswith("CLUSTERALERT_"):
                assert name == "CLUSTERALERT_CONFIG", name
    for config in (DEPLOY / "dev").glob("*.toml"):
        data = tomllib.loads(config.read_text())
        # Secrets live in the stack's volume; everything else must be valid here.
        for section in data.values():
            for table in section if isinstance(section, list) else [section]:
                if isinstance(table, dict) and "password_file" in table:
                    secret = tmp_path / Path(table["password_file"]).name
                    secret.write_text("x\n")
                    table["password_file"] = str(secret)
        parse_config(data, sections=tuple(data), base=tmp_path)
    example = tomllib.loads((DEPLOY / "producer.example.toml").read_text())
    example["broker"]["password_file"] = str(tmp_path / "x")
    (tmp_path / "x").write_text("x\n")
    parse_config(example, sections=("broker", "producer"), base=tmp_path)


def test_rabbitmq_definitions_declare_exactly_our_topology() -> None:
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert {(e["name"], e["type"], e["durable"], e["auto_delete"]) for e in defs["exchanges"]} == {
        (e.name, e.type, e.durable, False) for e in EXCHANGES
    }
    assert {q["name"]: (q["durable"], q["arguments"]) for q in defs["queues"]} == {
        q.name: (q.durable, q.arguments) for q in QUEUES
    }
    assert {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]} == {
        (b.exchange, b.queue, b.routing_key) for b in BINDINGS
    }
    assert all(x["vhost"] == "/" for key in ("exchanges", "queues", "bindings") for x in defs[key])
    # RabbitMQ 4 gives every quorum queue a delivery limit of 20. Browsing the DLQ does not
    # count toward it (worker.dlq), but what an interrupted dlq command held does: a policy
    # lifts it there (a queue argument of -1 would make 3.10 drop messages at once, so the
    # topology itself leaves it out).
    [policy] = defs["policies"]
    assert policy["definition"] == {"delivery-limit": -1}
    assert re.fullmatch(policy["pattern"], "clusteralert.dead")
    assert not re.fullmatch(policy["pattern"], "clusteralert.mail")


@pytest.fixture
def definition_users(vhost: str) -> Iterator[dict[str, str]]:
    """The definitions' users, made in the test's vhost with exactly the definitions'
    permissions and topic permissions: user name to AMQP URL."""
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    users = {p["user"]: p for p in defs["permissions"]}
    topics = defs["topic_permissions"]
    assert {t["user"] for t in topics} <= set(users)
    assert set(users) == {"clusteralert-producer", "clusteralert-worker"}
    init = (DEPLOY / "dev" / "init.sh").read_text()
    assert all(f'"name": "{user}"' in init for user in users)
    urls, made = {}, []
    try:
        for user, perms in users.items():
            name = f"{user}-{vhost[-6:]}"
            subprocess.run(
                ["rabbitmqctl", "-q", "add_user", name, "pw-" + name],
                check=True,
                capture_output=True,
            )
            made.append(name)
            subprocess.run(
                [
                    *("rabbitmqctl", "-q", "set_permissions", "-p", vhost, name),
                    *(perms["configure"], perms["write"], perms["read"]),
                ],
                check=True,
                capture_output=True,
            )
            for topic in (t for t in topics if t["user"] == user):
                subprocess.run(
                    [
                        *("rabbitmqctl", "-q", "set_topic_permissions", "-p", vhost, name),
                        *(topic["exchange"], topic["write"], topic["read"]),
                    ],
                    check=True,
                    capture_output=True,
                )
            urls[user] = f"amqp://{name}:pw-{name}@127.0.0.1:5672/{vhost}"
        yield urls
    finally:
        for name in made:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True)


def _config_as(url: str, tmp_path: Path, vhost: str, relay: SmtpServer, certs: Certs) -> Path:
    """The pipeline's config, connecting with ``url`` (user and password in it)."""
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    config.write_text(
        config.read_text()
        .replace('password_file = "amqp_password"', "")
        .replace(f"amqp://guest@127.0.0.1:5672/{vhost}", url)
    )
    return config


def _publish_event(
    url: str, event_id: str, routing_key: str = "node.1.n", body: bytes | None = None
) -> None:
    """One valid event (or ``body``) to the events exchange as ``url``'s user, confirmed."""
    import pika

    body = (
        body
        or json.dumps(
            {
                "v": 1,
                "id": event_id,
                "time": "2026-11-26T03:00:00Z",
                "cluster": "c",
                "node": "n",
                "module": "node",
                "event_id": 1,
                "params": {"server": "s"},
                "source": "t",
            }
        ).encode()
    )
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "clusteralert.events",
            routing_key,
            body,
            mandatory=True,
            properties=pika.BasicProperties(delivery_mode=2, message_id=event_id),
        )


@pytest.fixture
def definition_worker(
    definition_users: dict[str, str],
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> Callable[[str], tuple[SmtpServer, int]]:
    """Starts a worker as the definitions' worker user, with a STARTTLS relay and
    ``extra`` config: the relay and the worker's metrics port."""

    def start(extra: str = "") -> tuple[SmtpServer, int]:
        relay = smtp_server("starttls")
        url = definition_users["clusteralert-worker"]
        config = _config_as(url, tmp_path, vhost, relay, certs)
        config.write_text(config.read_text() + extra)
        return relay, start_worker(processes, config)[1]

    return start


def test_least_privilege_permissions_are_enough_and_no_more(
    definition_users: dict[str, str],
    definition_worker: Callable[[str], tuple[SmtpServer, int]],
    tmp_path: Path,
    processes: Callable[..., Process],
) -> None:
    """Users with exactly the definitions' permissions run the real pipeline, and the
    producer's user can do nothing but publish events and heartbeats: not a canary or a
    probe, not read, not declare."""
    import pika

    relay, port = definition_worker("")
    producer_url = definition_users["clusteralert-producer"]
    _publish_event(producer_url, "6f1c7f4e-4b7e-4a8e-9d55-0f4c3bfe2a10")
    assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
    # The real node agent as that user: its heartbeats and spooled events go through.
    node = "db01.example.com"
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(f"""
[broker]
urls = ["{producer_url}"]
[producer]
spool_dir = "agent-spool"
cluster = "c"
node = "{node}"
heartbeat_interval = 1
""")
    processes("clusteralert-producer", "run", "--config", str(agent_config))
    seen = f'clusteralert_node_last_seen_timestamp_seconds{{cluster="c",node="{node}"}}'
    wait_metric(port, seen, lambda v: v > 0, 30)
    emit(agent_config, "--module", "node", "--event-id", "1", "--param", "server=s")
    assert relay.wait_for(lambda got: len(got) == 2, timeout=30)
    # Not with the canary's or the probe's routing key (topic permission): RabbitMQ
    # closes the channel.
    params = pika.URLParameters(producer_url)
    for own in (canary_event(), probe_event()):
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            _publish_event(producer_url, own.id, routing_key(own), encode_event(own))
        assert refused.value.reply_code == 403
        assert f"access to topic '{routing_key(own)}'" in refused.value.reply_text
    # And nothing else: reading or declaring is refused for the producer.
    refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
    with pika.BlockingConnection(params) as connection, refused:
        connection.channel().basic_get("clusteralert.mail")
    refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
    with pika.BlockingConnection(params) as connection, refused:
        connection.channel().queue_declare("clusteralert.sneaky")


def test_the_canary_goes_the_whole_way_under_the_definitions_permissions(
    definition_worker: Callable[[str], tuple[SmtpServer, int]],
) -> None:
    """The worker's user publishes its probes and canaries to clusteralert.events (the
    compose stack turns the canary on): a canary is mailed and its success time set."""
    relay, port = definition_worker('\n[canary]\ninterval = 1\nto = ["canary@example.com"]\n')
    success = "clusteralert_canary_last_success_timestamp_seconds"
    wait_metric(port, success, lambda v: v > 0, 30)
    assert relay.wait_for(lambda got: len(got) >= 1, timeout=30)
    assert relay.received[0].rcpt_tos == ["canary@example.com"]


def test_worker_permissions_are_the_minimum_its_operations_need() -> None:
    """Derived from the topology with RabbitMQ's rules: declaring needs configure on the
    name, and a queue with a dead-letter exchange also write on that exchange and read
    on the queue; binding needs write on the queue and read on the exchange; consuming
    and the DLQ commands read their queue; unbinding 0.1's binding needs what binding does;
    retries, dead letters and replays write to clusteralert.retry, clusteralert.dlx and
    the default exchange (amq.default), and so do notifications. The events exchange is
    written only with the canary's and the probe's routing keys (topic permissions), and
    read only with the binding keys of the bindings to it."""
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    perms = {p["user"]: p for p in defs["permissions"]}["clusteralert-worker"]
    need: dict[str, set[str]] = {
        "configure": {e.name for e in EXCHANGES} | {q.name for q in QUEUES},
        # The canary and the probe.
        "write": {RETRY_EXCHANGE, DLX_EXCHANGE, "amq.default", EVENTS_EXCHANGE},
        # The silences stream is read by every worker and by the silence commands; they
        # write it through the default exchange.
        "read": {INCOMING_QUEUE, WORK_QUEUE, DEAD_QUEUE, SILENCES_STREAM},
    }
    for queue in QUEUES:
        if "x-dead-letter-exchange" in queue.arguments:
            need["write"].add(str(queue.arguments["x-dead-letter-exchange"]) or "amq.default")
            need["read"].add(queue.name)
    for binding in (*BINDINGS, *UNBINDINGS):  # unbinding needs what binding needs
        need["write"].add(binding.queue)
        need["read"].add(binding.exchange)
    others = {
        "amq.default",
        "amq.topic",
        "clusteralert.incomings",
        "clusteralert.sneaky",
        "clusteralert.silences2",
    }
    candidates = need["configure"] | others
    for kind, needed in need.items():
        # RabbitMQ searches (re:run) rather than matching the whole name.
        allowed = {name for name in candidates if re.search(perms[kind], name)}
        assert allowed == needed, f"{kind}: {sorted(allowed ^ needed)}"

    # Topic permissions on the events exchange: RabbitMQ checks the routing key of a
    # publish against write, and the key of a binding (or unbinding) against read.
    [topic] = [t for t in defs["topic_permissions"] if t["user"] == "clusteralert-worker"]
    assert topic["exchange"] == EVENTS_EXCHANGE
    ours = {routing_key(canary_event()), routing_key(probe_event())}
    others = {
        routing_key(heartbeat_event("c", "n", 60)),
        routing_key(new_event(module="node", event_id=1, cluster="c", node="n", source="t")),
        routing_key(
            new_event(module="clusteralert", event_id=9, cluster="c", node="n", source="t")
        ),
        "clusteralert.20.n",
        "x.clusteralert.2.n",
    }
    assert {k for k in ours | others if re.search(topic["write"], k)} == ours
    bound = {b.routing_key for b in (*BINDINGS, *UNBINDINGS) if b.exchange == EVENTS_EXCHANGE}
    keys = bound | {"node.#", "clusteralert.#", "*.1.*", ""}
    assert {k for k in keys if re.search(topic["read"], k)} == bound


def test_producer_topic_permission_refuses_only_the_canary_and_the_probe() -> None:
    """The producer's user publishes whatever a node sends (its events and heartbeats, for
    any node name) but never with the canary's or the probe's routing key, so a node
    cannot pass for the pipeline's own check of itself. It binds nothing."""
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    [topic] = [t for t in defs["topic_permissions"] if t["user"] == "clusteralert-producer"]
    assert topic["exchange"] == EVENTS_EXCHANGE
    nodes = (
        "n",
        "db01.example.com",  # dots become underscores in the key
        "ノード-1",
        "with space",
        "clusteralert.2.x",
        "2",
        "",
        "x" * 300,  # cut to 255 characters
    )

    def key(module: str, event_id: int, node: str) -> str:
        return routing_key(
            new_event(module=module, event_id=event_id, cluster="c", node=node, source="t")
        )

    sent = {routing_key(heartbeat_event("c", node, 60)) for node in nodes}
    sent |= {key(module, 1, node) for module in ("node", "clusteralert2") for node in nodes}
    sent |= {key("clusteralert", event_id, "n") for event_id in (0, 9, 20, 32)}
    sent |= {"clusteralert.1.n", "clusteralert.20.n", "x.clusteralert.2.n", ""}
    ours = {routing_key(canary_event()), routing_key(probe_event())}
    ours |= {key("clusteralert", event_id, node) for event_id in (2, 3) for node in nodes}
    # RabbitMQ searches (re:run) rather than matching the whole key, like Python's search.
    assert {k for k in sent | ours if re.search(topic["write"], k)} == sent
    # Nothing but the empty key, which is what RabbitMQ makes of an empty pattern; binding
    # is refused before this is asked anyway (no read on the exchange, no write on a queue).
    assert not {
        k for k in ("#", "node.#", "clusteralert.#", "*.1.*") if re.search(topic["read"], k)
    }


def test_the_worker_user_retries_dead_letters_and_replays_but_cannot_publish_events(
    definition_users: dict[str, str],
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Everything the worker does, as the worker's user on a fresh vhost: declare the
    topology, consume, climb the retry ladder, dead-letter, replay from the DLQ. And it
    cannot publish events to clusteralert.events: neither an alert nor a heartbeat."""
    import pika

    worker_url = definition_users["clusteralert-worker"]
    producer_url = definition_users["clusteralert-producer"]
    relay = smtp_server("starttls")
    relay.handler.data_replies = ["451 4.3.0 try again later"] * 20
    config = _config_as(worker_url, tmp_path, vhost, relay, certs)
    _, port = start_worker(processes, config)  # declares the whole topology as this user

    def queued(queue: str) -> int:
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
            declared = connection.channel().queue_declare(queue, passive=True)
            return int(declared.method.message_count)

    retried, dead = "0c7d2a51-3f4e-4b6a-8c1d-2e5f6a7b8c90", "1d8e3b62-4a5f-4c7b-9d2e-3f6a7b8c9d01"
    _publish_event(producer_url, retried)
    wait_metric(port, 'clusteralert_retries_total{stage="delayed"}', lambda v: v == 1, 30)
    wait_until(lambda: queued(retry_queue_name(RETRY_DELAYS[0][0])) == 1, 10, "the retry rung")

    relay.handler.data_replies = ["550 5.7.1 refused"]
    _publish_event(producer_url, dead)
    wait_metric(
        port, 'clusteralert_dead_lettered_total{reason="rejected_5xx"}', lambda v: v == 1, 30
    )
    replay = dlq(config, "replay", "--id", dead)
    assert replay.returncode == 0, replay.stderr
    assert relay.wait_for(lambda got: [m.event_id for m in got] == [dead], timeout=30)
    assert queued(DEAD_QUEUE) == 0

    for key in ("node.1.n", "clusteralert.1.n"):
        refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
        with pika.BlockingConnection(pika.URLParameters(worker_url)) as connection, refused:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("clusteralert.events", key, b"{}", mandatory=True)


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    tool = promtool()
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES, tmp_path / "rules.yml")
    config.write_text(
        (DEPLOY / "prometheus" / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/rules.yml", "rules.yml")
    )
    for args in (
        ["check", "config", str(config)],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml")],
    ):
        result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def _start_node_agent(processes: Callable[..., Process], config: Path) -> int:
    """``clusteralert-producer run`` with ``config`` and its metrics on a free port, which
    it returns once the endpoint answers."""
    port = free_port()
    agent_config = config.with_name("agent.toml")
    agent_config.write_text(
        config.read_text().replace("[producer]", f"[producer]\nmetrics_port = {port}")
    )
    processes("clusteralert-producer", "run", "--config", str(agent_config))
    wait_until(lambda: scrape(port), 30, "the node agent's metrics")
    return port


def _used_metric_names(prefix: str) -> set[str]:
    text = DASHBOARD.read_text() + RULES.read_text()
    names = set(re.findall(rf"\b{prefix}_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_every_metric_in_dashboard_and_rules_is_exported(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    from worker.broker import connect_any, declare_topology

    relay = smtp_server("starttls")
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    _, port = start_worker(processes, config)
    # The node agent's own endpoint (the spool rules use it); its first heartbeat gives
    # the worker its per-node series.
    agent_port = _start_node_agent(processes, config)
    wait_until(
        lambda: any(k.startswith("clusteralert_node_last_seen") for k in scrape(port)),
        30,
        "the node agent's first heartbeat on the worker",
    )
    exported = {re.sub(r"\{.*", "", k) for k in scrape(port)}
    exported |= {re.sub(r"\{.*", "", k) for k in scrape(agent_port)}
    exported |= {re.sub(r"_(bucket|count|sum|total|created)$", "", k) for k in exported}
    used = _used_metric_names("clusteralert")
    assert used, "the dashboard and rules use clusteralert metrics"
    assert used <= exported, used - exported
    # RabbitMQ's per-queue metrics, from the prometheus plugin's per-object endpoint.
    broker = parse_config({"broker": {"urls": [amqp_url(vhost)]}}, sections=("broker",)).broker
    with connect_any(broker)[0] as connection:
        declare_topology(connection.default_channel)
    used = _used_metric_names("rabbitmq")

    def rabbit_names() -> set[str]:
        url = "http://127.0.0.1:15692/metrics/per-object"
        with urllib.request.urlopen(url, timeout=10) as response:
            return set(re.findall(r"^(rabbitmq_[a-z0-9_]+)\{", response.read().decode(), re.M))

    # Queue statistics are emitted every few seconds, so new queues show up a bit later.
    wait_until(lambda: used <= rabbit_names(), 30, f"RabbitMQ exporting {sorted(used)}")


def _dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        t["legendFormat"] + "|" + p["title"]: t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", ())  # a row has none
    }


def test_prometheus_scrapes_two_workers_and_the_dashboard_queries_answer(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    relay = smtp_server("starttls")
    config = write_config(tmp_path, vhost, [relay], certs, auth=False)
    ports = [start_worker(processes, config)[1] for _ in range(2)]
    query = start_prometheus(
        processes,
        tmp_path,
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "clusteralert-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                }
            ],
        },
    )

    def instances(expr: str) -> set[str]:
        return {
            str(r["metric"].get("instance"))
            for r in query(expr)  # type: ignore[union-attr]
            if r.get("value")
        }

    # Let Prometheus see both workers before the mail flows, so the counters move
    # between its scrapes.
    wait_until(lambda: len(instances("up == 1")) == 2, 30, "Prometheus scraping both workers")
    publish_events(vhost, 40)
    assert relay.wait_for(lambda got: len(got) == 40, timeout=60)

    exprs = {k.split("|", 1)[1]: v for k, v in _dashboard_exprs().items()}

    def both(expr: str) -> bool:
        return len(instances(expr)) == 2

    per_worker = exprs["Mails sent / s per worker"].replace("$instance", ".*")
    wait_until(
        lambda: both(per_worker) and all(float(r["value"][1]) > 0 for r in query(per_worker)),
        60,  # type: ignore[index]
        "a send rate from both workers",
    )
    tls = (
        exprs["TLS refused / s by cause"]
        .replace("$instance", ".*")
        .replace("sum by (cause)", "sum by (instance, cause)")
    )
    assert both(tls)
    ratio = exprs["Failure ratio"].replace("$instance", ".*")
    [value] = query(ratio)
    assert float(value["value"][1]) == 0.0  # type: ignore[index]
    # Days left on the relay's certificate (trustme's default notAfter), one series per
    # relay however many workers report it.
    days = exprs["Relay certificate: days left"].replace("$instance", ".*")
    days = days.replace("$relay", ".*")
    wait_until(lambda: query(days), 30, "the certificate panel's query answering")
    [left] = query(days)
    expected = (datetime(3000, 1, 1, tzinfo=UTC) - datetime.now(UTC)) / timedelta(days=1)
    assert left["metric"] == {"relay": f"127.0.0.1:{relay.port}"}
    assert float(left["value"][1]) == pytest.approx(expected, abs=0.01)  # type: ignore[index]
    # The Incidents row: every worker says whether its stage is active, and one is.
    keyed = _dashboard_exprs()
    active = keyed["active {{instance}}|Held events and active stage per worker"]
    active = active.replace("$instance", ".*")
    assert both(active)
    assert sorted(float(r["value"][1]) for r in query(active)) == [0.0, 1.0]  # type: ignore[index]


# The users the images run as: ours from deploy/Dockerfile; Grafana's image runs as 472;
# RabbitMQ's entrypoint drops to its rabbitmq user (999); Mailpit's image runs as root.
_OUR_UID = re.search(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text())
assert _OUR_UID is not None
IMAGE_USERS = {
    "clusteralert": int(_OUR_UID.group(1)),
    "grafana/grafana": 472,
    "rabbitmq": 999,
    "axllent/mailpit": 0,
    "prom/alertmanager": 65534,  # nobody, its Dockerfile's USER
}


def _compose_services() -> dict[str, dict[str, object]]:
    services: dict[str, dict[str, object]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _mounts(service: dict[str, object]) -> list[tuple[str, str, str]]:
    """(source, target, "ro" or "rw") of each volume; ./ starts a bind mount's source."""
    volumes: list[str] = service.get("volumes", [])  # type: ignore[assignment]
    mounts = []
    for volume in volumes:
        source, target, *options = volume.split(":")
        mounts.append((source, target, "ro" if options == ["ro"] else "rw"))
    return mounts


def _secret_volumes() -> set[str]:
    return {v for v in yaml.safe_load(COMPOSE.read_text())["volumes"] if v.startswith("secrets")}


def test_each_service_mounts_only_its_own_secrets_volume() -> None:
    secret_volumes = _secret_volumes()
    own = {
        "mailpit": {"secrets-mailpit"},
        "worker": {"secrets-worker"},
        "producer": {"secrets-producer"},
        "grafana": {"secrets-grafana"},
        "alertmanager": {"secrets-alertmanager"},
    }
    for name, service in _compose_services().items():
        mounts = [m for m in _mounts(service) if m[0] in secret_volumes]
        # init makes them all; the broker admin's password volume is for the operator.
        expected = secret_volumes if name == "init" else own.get(name, set())
        assert {source for source, _, _ in mounts} == expected, name
        assert all(options == ("rw" if name == "init" else "ro") for _, _, options in mounts)


def _referenced_secrets(service: dict[str, object]) -> set[str]:
    """The /secrets paths a service's environment and mounted configs name."""
    environment: dict[str, object] = service.get("environment", {})  # type: ignore[assignment]
    paths = {str(v) for v in environment.values() if str(v).startswith("/secrets/")}
    for source, _, _ in _mounts(service):
        if source.startswith("./") and source.endswith(".toml"):
            text = (ROOT / source).read_text()
            paths |= set(re.findall(r'"(/secrets/[^"]+)"', text))
        if source.startswith("./") and source.endswith(".yml"):
            text = (ROOT / source).read_text()
            paths |= set(re.findall(r"(/secrets/[\w.-]+)", text))
    return paths


def _as_root(script: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` as root: for real when we are, else under fakeroot."""
    command = ["sh", "-c", script] if os.geteuid() == 0 else ["fakeroot", "sh", "-c", script]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _init_tree(tree: Path) -> Path:
    """A tree that mirrors the init container's mounts on a first start: bind mounts
    link to the repository, named volumes are empty directories."""
    init = _compose_services()["init"]
    for source, target, _ in _mounts(init):
        path = tree / target.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if source.startswith("./"):
            path.symlink_to(ROOT / source)
        else:
            path.mkdir()  # a fresh named volume: an empty directory
    return tree


@functools.cache
def _alpine_like_path() -> str:
    """A PATH like the init image's (deploy/init/Dockerfile): BusyBox's applets, as in
    Alpine, and openssl; nothing else."""
    busybox = shutil.which("busybox")
    openssl = shutil.which("openssl")
    if busybox is None or openssl is None:
        pytest.fail("busybox and openssl are needed: install Debian's packages (scripts/test does)")
    applets = Path(tempfile.mkdtemp(prefix="clusteralert-busybox-"))
    atexit.register(shutil.rmtree, applets, ignore_errors=True)
    applets.chmod(0o755)
    listing = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True)
    for applet in listing.stdout.split():
        (applets / applet).symlink_to(busybox)
    (applets / "openssl").symlink_to(openssl)
    return str(applets)


def _init_command(tree: Path) -> str:
    """deploy/dev/init.sh in ``tree``, run as the init container runs it: by BusyBox's
    sh, with only BusyBox's applets and openssl on the PATH."""
    path = _alpine_like_path()
    env = f"PATH={shlex.quote(path)} INIT_ROOT={shlex.quote(str(tree))}"
    return f"{env} {path}/sh {shlex.quote(str(tree / 'init.sh'))} >/dev/null"


def _run_init(tree: Path) -> dict[str, tuple[int, int, str]]:
    """Run deploy/dev/init.sh in ``tree``, which mirrors the init container's mounts, as
    on a first start and then a restart (keeping a copy of what the first start made in
    ``tree``/../first), and list every path in the tree as (uid, mode, type). Under
    fakeroot when we are not root, which fakes only the owners."""
    run = _init_command(_init_tree(tree))
    first = tree.parent / "first"
    copy = " && ".join(
        f"cp -a {shlex.quote(str(tree / d))} {shlex.quote(str(first / d))}"
        for d in ("secrets", "rabbitmq-definitions")
    )
    script = (
        f"mkdir {shlex.quote(str(first))} && {run} && {copy} && {run} && "
        f"find {shlex.quote(str(tree))} -mindepth 1 -printf '%P\\t%U\\t%m\\t%y\\n'"
    )
    listing = {}
    for line in _as_root(script).splitlines():
        path, uid, mode, kind = line.split("\t")
        listing[path] = (int(uid), int(mode, 8), kind)
    return listing


def _hash_matches(password_hash: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ pw))."""
    raw = base64.b64decode(password_hash)
    return raw[4:] == hashlib.sha256(raw[:4] + password.encode()).digest()


def test_init_makes_one_secret_set_per_service_readable_only_by_its_user(tmp_path: Path) -> None:
    """deploy/dev/init.sh for real (openssl from Debian), then what each service would
    see through its own mounts: exactly the secrets its config names, owned by the user
    its image runs as, readable by nobody else; the broker admin's password and the
    relay's key reach no other service."""
    tree = tmp_path / "init"
    listing = _run_init(tree)
    services = _compose_services()
    init_targets = {s: t.lstrip("/") for s, t, _ in _mounts(services["init"])}
    secrets = tree / "secrets"

    def secret(name: str) -> Path:
        return next(secrets.rglob(name))

    admin_password = secret("admin_amqp_password").read_text()
    relay_key = secret("smtp-key.pem").read_text()
    assert len(admin_password) == 32 and "PRIVATE KEY" in relay_key
    seen: dict[str, dict[str, tuple[int, int, str]]] = {}  # container path -> (uid, mode, type)
    for name, service in services.items():
        if name == "init":
            continue
        visible = seen[name] = {}
        contents = ""
        for source, target, _ in _mounts(service):
            if source not in init_targets:
                continue
            volume = init_targets[source]
            visible[target] = listing[volume]
            for path, entry in listing.items():
                if path.startswith(volume + "/"):
                    visible[target + path[len(volume) :]] = entry
                    contents += (tree / path).read_text()
        files = {path for path, (_, _, kind) in visible.items() if kind == "f"}
        assert {p for p in files if p.startswith("/secrets/")} == _referenced_secrets(service), name
        assert admin_password not in contents, name
        assert (relay_key in contents) == (name == "mailpit"), name
    for name, visible in seen.items():
        uid = IMAGE_USERS.get(str(services[name]["image"]).split(":")[0])
        for path, (owner, mode, kind) in visible.items():
            assert (owner, mode) == (uid, 0o700 if kind == "d" else 0o400), (name, path, oct(mode))
    # Alertmanager verifies Mailpit with the CA that signed Mailpit's certificate.
    ca = (secrets / "worker" / "smtp-ca.pem").read_bytes()
    assert (secrets / "alertmanager" / "smtp-ca.pem").read_bytes() == ca
    # RabbitMQ gets salted hashes of the very passwords the services read (and the
    # operator's admin password); the restart kept every password.
    users = json.loads((tree / "rabbitmq-definitions" / "00-users.json").read_text())["users"]
    hashes = {u["name"]: u["password_hash"] for u in users}
    for user in ("clusteralert-producer", "clusteralert-worker", "admin"):
        file = secret(user.removeprefix("clusteralert-") + "_amqp_password")
        password = file.read_text()
        assert _hash_matches(hashes[user], password), user
        assert (tmp_path / "first" / "secrets" / file.relative_to(secrets)).read_text() == password
    # Unchanged passwords give unchanged definitions (the same salts), so the broker's
    # import (deploy/rabbitmq/import-definitions.sh) sees them as already imported.
    for made in (tree / "rabbitmq-definitions").iterdir():
        first = tmp_path / "first" / "rabbitmq-definitions" / made.name
        assert first.read_bytes() == made.read_bytes(), made.name


# A node's users as the README's install makes them (ids are arbitrary).
CLUSTERALERT_UID, HACLUSTER_UID, HACLIENT_GID = 10001, 10002, 10003
TMPFILES = DEPLOY / "systemd" / "clusteralert.tmpfiles.conf"


def test_bare_node_install_gives_the_broker_password_to_the_agent_alone() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Installing the producer on a bare node", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines()]
    [install] = [words for words in lines if "/etc/clusteralert/amqp_password" in words]
    options = dict(zip(install[1::2], install[2::2], strict=False))
    assert (install[0], options.get("-m"), options.get("-o")) == ("install", "0400", "clusteralert")
    assert "-g" not in options  # the group, haclient for the Pacemaker agent, gets nothing
    # The tmpfiles.d entry is installed and applied, so every boot restores the modes.
    assert [
        "install",
        "-m",
        "0644",
        str(TMPFILES.relative_to(ROOT)),
        "/etc/tmpfiles.d/clusteralert.conf",
    ] in lines
    assert ["systemd-tmpfiles", "--create", "/etc/tmpfiles.d/clusteralert.conf"] in lines
    example = (DEPLOY / "producer.example.toml").read_text()
    assert re.search(r"password_file = .*# owner clusteralert, mode 0400", example)


def test_tmpfiles_entry_makes_the_broker_password_the_agents_alone(tmp_path: Path) -> None:
    """Debian's systemd-tmpfiles applies the entry to a node's tree that an older install
    left group-readable: the password becomes clusteralert's alone, while the Pacemaker
    agent's group still reaches the config directory."""
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        pytest.fail("systemd-tmpfiles is missing: install Debian's systemd package")
    root = tmp_path / "node"
    (root / "etc" / "clusteralert").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\n"
        f"clusteralert:x:{CLUSTERALERT_UID}:{HACLIENT_GID}::/var/lib/clusteralert:/bin/false\n"
        f"hacluster:x:{HACLUSTER_UID}:{HACLIENT_GID}::/var/lib/pacemaker:/bin/false\n"
    )
    (root / "etc" / "group").write_text(f"root:x:0:\nhaclient:x:{HACLIENT_GID}:hacluster\n")
    password = root / "etc" / "clusteralert" / "amqp_password"
    password.write_text("secret\n")
    listing = _as_root(
        f"chown 0:{HACLIENT_GID} {password} && chmod 0640 {password} && "
        f"{tool} --create --root={root} {TMPFILES} && "
        f"stat -c '%u %g %a' {password.parent} {password}"
    )
    assert listing.split("\n")[:2] == [f"0 {HACLIENT_GID} 750", f"{CLUSTERALERT_UID} 0 400"]


def test_the_pacemaker_agent_spools_without_the_broker_password() -> None:
    """Pacemaker runs the agent wrapper as hacluster (group haclient). The node's broker
    password is clusteralert's alone, and the agent never needs it: it only spools."""
    # Not under pytest's tmp_path, which only root may enter.
    base = Path(tempfile.mkdtemp(prefix="clusteralert-node-"))
    try:
        base.chmod(0o755)
        password = base / "amqp_password"
        password.write_text("secret\n")
        spool = base / "spool"
        spool.mkdir()
        config = base / "clusteralert.toml"
        config.write_text(
            '[broker]\nurls = ["amqp://producer@127.0.0.1:5672/%2F"]\n'
            f'password_file = "{password}"\n'
            f'[producer]\nspool_dir = "{spool}"\ncluster = "prod"\n'
        )
        agent = base / "clusteralert-alert"
        wrapper = (DEPLOY / "pacemaker" / "clusteralert-alert").read_text()
        assert "exec /opt/clusteralert/bin/clusteralert-producer pacemaker" in wrapper
        agent.write_text(wrapper.replace("/opt/clusteralert/bin/", f"{BIN}/"))
        agent.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(password, CLUSTERALERT_UID, 0)
            password.chmod(0o400)
            os.chown(spool, CLUSTERALERT_UID, HACLIENT_GID)
            spool.chmod(0o2770)
            # In group haclient without any capability, so that file modes bind it like
            # hacluster. It keeps uid 0 only because this machine's Python lives in /root.
            as_hacluster = ["setpriv", f"--regid={HACLIENT_GID}", "--clear-groups"]
            as_hacluster += ["--bounding-set=-all", "--inh-caps=-all"]
        else:
            password.chmod(0)  # no owner we could hand it to: unreadable for us too
            as_hacluster = []
        peek = subprocess.run([*as_hacluster, "cat", str(password)], capture_output=True)
        assert peek.returncode != 0 and b"secret" not in peek.stdout
        alert = {
            "CRM_alert_version": "2.1.5",
            "CRM_alert_recipient": "ops@example.com",
            "CRM_alert_node_sequence": "17",
            "CRM_alert_timestamp": "2026-11-26 03:00:00.123456",
            "CRM_alert_kind": "node",
            "CRM_alert_node": "node2",
            "CRM_alert_nodeid": "2",
            "CRM_alert_desc": "lost",
        }
        env = {"PATH": os.environ["PATH"], "CLUSTERALERT_CONFIG": str(config), **alert}
        run = subprocess.run(
            [*as_hacluster, str(agent)], capture_output=True, text=True, timeout=60, env=env
        )
        assert run.returncode == 0, run.stderr
        assert len(list(spool.glob("0*.json"))) == 1
    finally:
        shutil.rmtree(base)


# --- The compose stack across `down`/`up`, health, init image, definitions, TLS ---


def test_rabbitmq_keeps_its_data_under_a_fixed_node_name() -> None:
    """RabbitMQ keeps its database in /var/lib/rabbitmq/mnesia/<node name>, and the node
    name defaults to rabbit@<host name>, which Compose sets to the container id: without a
    fixed host name every recreated container starts an empty broker beside the old one."""
    rabbitmq = _compose_services()["rabbitmq"]
    hostname = rabbitmq.get("hostname")
    assert isinstance(hostname, str) and hostname, "rabbitmq needs a fixed hostname"
    environment: dict[str, str] = rabbitmq.get("environment", {})  # type: ignore[assignment]
    assert environment.get("RABBITMQ_NODENAME") == f"rabbit@{hostname}"
    # The data directory is a named volume, which `down` (without -v) keeps.
    volumes = yaml.safe_load(COMPOSE.read_text())["volumes"]
    [data] = [s for s, t, _ in _mounts(rabbitmq) if t == "/var/lib/rabbitmq"]
    assert data in volumes


def _one_shot_services() -> set[str]:
    """Services that others wait on to complete successfully."""
    return {
        name
        for service in _compose_services().values()
        for name, dependency in service.get("depends_on", {}).items()  # type: ignore[attr-defined]
        if dependency["condition"] == "service_completed_successfully"
    }


def _effective_healthcheck(service: dict[str, object]) -> list[str] | None:
    """The probe Docker runs: the service's own, else its image's HEALTHCHECK."""
    if "healthcheck" in service:
        check: dict[str, object] = service["healthcheck"]  # type: ignore[assignment]
        test: list[str] = check["test"]  # type: ignore[assignment]
        return None if check.get("disable") or test == ["NONE"] else test
    if service.get("image") == "clusteralert:dev":
        dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
        match = re.search(r"^HEALTHCHECK .*?CMD (\[.+\])$", dockerfile, re.M)
        return ["CMD", *json.loads(match.group(1))] if match else None
    return None


def _metrics_probe(test: list[str]) -> tuple[int, str, list[str]]:
    """(port, metric sample, command) of one of our /metrics probes."""
    assert test[0] == "CMD" and test[1:3] == ["python", "-c"], test
    code = test[3]
    port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", code)
    sample = re.search(r"'(clusteralert_[a-z_]+ [0-9.]+)'", code)
    assert port and sample, code
    return int(port.group(1)), sample.group(1), [sys.executable, "-c", code]


def _metrics_port(service: dict[str, object]) -> int:
    """The metrics port of the clusteralert program a service runs, from its config."""
    environment: dict[str, str] = service.get("environment", {})  # type: ignore[assignment]
    command: list[str] = service.get("command", [])  # type: ignore[assignment]
    path = environment.get("CLUSTERALERT_CONFIG") or command[command.index("--config") + 1]
    [source] = [s for s, t, _ in _mounts(service) if t == path]
    config = tomllib.loads((ROOT / source).read_text())
    port = config["metrics"]["port"] if "metrics" in config else config["producer"]["metrics_port"]
    assert isinstance(port, int)
    return port


def test_every_service_has_a_healthcheck_and_ours_probe_their_own_port() -> None:
    """`docker compose up --wait` waits for every service's health: each long-running
    service has a probe, and ours probe the port their own config serves metrics on
    (the producer inherited the worker's probe of 9464, so it could never be healthy)."""
    services = _compose_services()
    for name, service in services.items():
        if name in _one_shot_services():
            continue  # a job that others wait on to complete, not to be healthy
        test = _effective_healthcheck(service)
        assert test, f"{name} has no healthcheck"
        if service.get("image") == "clusteralert:dev":
            port, _, _ = _metrics_probe(test)
            assert port == _metrics_port(service), name
            assert str(port) in service.get("expose", []), name  # type: ignore[operator]
        # Upstream images' HTTP probes: the port the service publishes.
        for url_port in re.findall(r"http://localhost:(\d+)/", " ".join(test)):
            ports: list[str] = service.get("ports", [])  # type: ignore[assignment]
            assert any(p.endswith(f":{url_port}") for p in ports), (name, url_port)


def test_our_healthchecks_pass_against_the_real_programs(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Each of our services' probe, run against the real program it checks (a worker and
    a node agent connected to the broker), with its port moved to a free one: healthy.
    And a node agent whose broker is unreachable is not."""
    config = write_config(tmp_path, vhost, [smtp_server("starttls")], certs, auth=False)
    _, worker_port = start_worker(processes, config)
    producer_port = _start_node_agent(processes, config)
    wait_metric(producer_port, "clusteralert_producer_broker_connected", lambda v: v == 1, 30)
    services = _compose_services()

    def probe(name: str, real_port: int) -> int:
        test = _effective_healthcheck(services[name])
        assert test, name
        port, _, command = _metrics_probe(test)
        command[-1] = command[-1].replace(f":{port}/", f":{real_port}/")
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    assert probe("worker", worker_port) == 0
    assert probe("producer", producer_port) == 0
    cut_off = tmp_path / "cut-off" / "clusteralert.toml"
    cut_off.parent.mkdir()
    cut_off.write_text(
        config.read_text()
        .replace("127.0.0.1:5672", f"127.0.0.1:{free_port()}")  # nothing listens there
        .replace('password_file = "amqp_password"', f'password_file = "{tmp_path}/amqp_password"')
        .replace('spool_dir = "spool"', f'spool_dir = "{tmp_path}/cut-off/spool"')
    )
    cut_off_port = _start_node_agent(processes, cut_off)
    assert probe("producer", cut_off_port) == 1


_PACKAGE_INSTALL = re.compile(
    r"\b(apk\s+add|apt(-get)?\s+install|dnf\s+install|yum\s+install|microdnf|"
    r"pip3?\s+install|npm\s+(install|ci))\b"
)


def test_nothing_installs_packages_at_run_time() -> None:
    """Containers start without reaching a package mirror: init's openssl is in an image
    built from deploy/init/Dockerfile, and no command, entrypoint, healthcheck or script
    of the stack installs anything."""
    services = _compose_services()
    for name, service in services.items():
        for key in ("command", "entrypoint", "healthcheck"):
            assert not _PACKAGE_INSTALL.search(json.dumps(service.get(key, ""))), (name, key)
    scripts = [ROOT / s for svc in services.values() for s, _, _ in _mounts(svc) if s[:2] == "./"]
    for path in scripts:
        for script in [path] if path.is_file() else sorted(path.rglob("*.sh")):
            assert not _PACKAGE_INSTALL.search(script.read_text()), script
    init = services["init"]
    build: dict[str, str] = init["build"]  # type: ignore[assignment]
    dockerfile = (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).read_text()
    assert re.search(r"^FROM alpine:\d+\.\d+\.\d+$", dockerfile, re.M)  # pinned
    assert re.search(r"^RUN apk add --no-cache openssl$", dockerfile, re.M)
    assert init["image"] != "alpine" and not str(init["image"]).startswith("alpine:")


def _tls_handshake_strict(ca_file: Path, cert: Path, key: Path, hostname: str) -> None:
    """A real TLS server on loopback serving ``cert``, and a client that verifies it as
    Python 3.13 does by default (VERIFY_X509_STRICT) against ``ca_file`` for
    ``hostname``; raises ssl.SSLError when the chain does not verify."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca_file))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            connection, _ = listener.accept()
            with (
                contextlib.suppress(ssl.SSLError, OSError),
                server_context.wrap_socket(connection, server_side=True) as tls,
            ):
                tls.recv(1)
            connection.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_context.wrap_socket(raw, server_hostname=hostname) as tls,
            ):
                tls.sendall(b"x")
        finally:
            server.join(10)


def _relay_tls_files(tree: Path) -> tuple[Path, Path, Path]:
    """(the worker's CA file, Mailpit's certificate, Mailpit's key) as init made them."""
    secrets = tree / "secrets"
    return (
        secrets / "worker" / "smtp-ca.pem",
        secrets / "mailpit" / "smtp-cert.pem",
        secrets / "mailpit" / "smtp-key.pem",
    )


def test_dev_ca_and_relay_certificate_verify_under_x509_strict(tmp_path: Path) -> None:
    """The worker verifies Mailpit's certificate with the CA init made, under the strict
    checks Python 3.13 turns on by default: the CA needs keyUsage (keyCertSign) and the
    leaf an authority key identifier, or the handshake fails."""
    tree = _init_tree(tmp_path / "init")
    _as_root(_init_command(tree))
    ca_file, cert, key = _relay_tls_files(tree)
    _tls_handshake_strict(ca_file, cert, key, "mailpit")
    # And the check is real: another name fails.
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake_strict(ca_file, cert, key, "relay.example.com")


def _not_after(cert: Path) -> datetime:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def test_init_renews_a_relay_certificate_that_nears_expiry(tmp_path: Path) -> None:
    """init runs at every `up`: a relay certificate that expires within 30 days (here:
    tomorrow, from an older CA without keyUsage) is replaced, CA included, and the new
    chain verifies; a valid one is kept."""
    tree = _init_tree(tmp_path / "init")
    _as_root(_init_command(tree))
    ca_file, cert, key = _relay_tls_files(tree)
    kept = cert.read_bytes()
    _as_root(_init_command(tree))
    assert cert.read_bytes() == kept  # far from expiry: unchanged
    old = tmp_path / "old"
    old.mkdir()
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=mailpit", "-addext", "subjectAltName=DNS:mailpit"),
            *("-keyout", str(old / "key.pem"), "-out", str(old / "cert.pem")),
        ],
        check=True,
        capture_output=True,
    )
    for source, target in (
        (old / "cert.pem", cert),
        (old / "key.pem", key),
        (old / "cert.pem", ca_file),
    ):
        target.chmod(0o600)
        shutil.copyfile(source, target)
    assert _not_after(cert) < datetime.now(UTC) + timedelta(days=2)
    _as_root(_init_command(tree))
    assert _not_after(cert) > datetime.now(UTC) + timedelta(days=300)
    assert ca_file.read_bytes() != (old / "cert.pem").read_bytes()
    _tls_handshake_strict(ca_file, cert, key, "mailpit")
    assert (cert.stat().st_mode & 0o777, ca_file.stat().st_mode & 0o777) == (0o400, 0o400)


def test_demo_events_are_spooled_once_per_spool_volume(tmp_path: Path) -> None:
    """The demo producer's command, run twice as two starts of the container on the same
    spool volume: the two demo events are spooled on the first start only."""
    producer = _compose_services()["producer"]
    assert producer["entrypoint"] == ["sh", "-c"]
    command: list[str] = producer["command"]  # type: ignore[assignment]
    script = " ".join(command).replace("$$", "$")  # Compose's escape for a literal $
    [spool_target] = [t for s, t, _ in _mounts(producer) if s == "spool"]
    config_source = next(s for s, t, _ in _mounts(producer) if t.endswith("producer.toml"))
    config_text = (ROOT / config_source).read_text()
    assert f'spool_dir = "{spool_target}"' in config_text
    spool = tmp_path / "spool"
    config = tmp_path / "producer.toml"
    config.write_text(config_text.replace(spool_target, str(spool)))
    forward = "exec clusteralert-producer run"
    assert script.endswith(forward)
    # Instead of forwarding (which would empty the spool), report what is waiting.
    script = script.replace(spool_target, str(spool)).replace(
        forward, "exec clusteralert-producer status --json"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "CLUSTERALERT_CONFIG": str(config)}
    for start in (1, 2):
        run = subprocess.run(
            ["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60
        )
        assert run.returncode == 0, run.stderr
        status = json.loads(run.stdout[run.stdout.index("{") :])  # after emit's ids
        assert status["events"] == 2, start


IMPORT_SCRIPT = DEPLOY / "rabbitmq" / "import-definitions.sh"


def test_definitions_are_imported_by_a_one_shot_service_not_at_boot() -> None:
    """RabbitMQ 4.0.5's boot-time import with definitions.skip_if_unchanged discards the
    import's result and stores the new hash anyway, so a failed import goes unnoticed
    while the broker passes its healthcheck. The broker imports nothing at boot; a
    one-shot service of the same image imports after it is up, and the services that
    use the broker wait for that import to succeed."""
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    keys = [line.split("=")[0].strip() for line in conf.splitlines() if "=" in line]
    assert not [k for k in keys if k.startswith(("definitions.", "load_definitions"))], keys
    services = _compose_services()
    [name] = [
        n for n, s in services.items() if f"/{IMPORT_SCRIPT.name}" in json.dumps(s.get("command"))
    ]
    importer = services[name]
    assert importer["image"] == services["rabbitmq"]["image"]  # no other image to fetch
    assert importer["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    rabbitmq_env: dict[str, str] = services["rabbitmq"]["environment"]  # type: ignore[assignment]
    importer_env: dict[str, str] = importer["environment"]  # type: ignore[assignment]
    assert importer_env["RABBITMQ_NODENAME"] == rabbitmq_env["RABBITMQ_NODENAME"]
    # It reaches the node with the node's own Erlang cookie, from the data volume.
    assert ("rabbitmq-data", "/var/lib/rabbitmq", "ro") in _mounts(importer)
    # And removes the default user RabbitMQ seeds when nothing is imported at boot
    # (guest, as rabbitmq.conf names no other default_user).
    assert importer["command"][-1] == "guest"  # type: ignore[index]
    assert "default_user" not in conf
    for user in ("worker", "producer"):
        depends: dict[str, dict[str, str]] = services[user]["depends_on"]  # type: ignore[assignment]
        assert depends.get(name) == {"condition": "service_completed_successfully"}, user


def _definitions_for_vhost(source: Path, target: Path, vhost: str, suffix: str) -> None:
    """init's definitions, moved to ``vhost`` with user names ending in ``suffix``: the
    broker is shared, so the test imports into its own vhost and users."""
    target.mkdir(mode=0o755)
    for path in sorted(source.iterdir()):
        defs = json.loads(path.read_text())
        # The test broker is RabbitMQ 3.10, which rejects 4.x's policy (delivery-limit -1
        # for quorum queues); test_rabbitmq_definitions_declare_exactly_our_topology
        # checks that policy.
        defs.pop("policies", None)
        for key in ("vhosts",):
            for item in defs.get(key, []):
                item["name"] = vhost
        for key in ("permissions", "topic_permissions", "exchanges", "queues", "bindings"):
            for item in defs.get(key, []):
                item["vhost"] = vhost
        for item in defs.get("users", []):
            item["name"] += suffix
        for item in (*defs.get("permissions", []), *defs.get("topic_permissions", [])):
            item["user"] += suffix
        (target / path.name).write_text(json.dumps(defs))
        (target / path.name).chmod(0o644)  # the broker's CLI reads it as user rabbitmq


def test_definitions_import_once_and_fail_loudly(vhost: str, tmp_path: Path) -> None:
    """The import script against the real broker (Debian's RabbitMQ and rabbitmqctl), on
    init's real definitions moved to a vhost of the test's own: it imports them (the
    worker's password logs in), does nothing while they are unchanged (a queue deleted in
    between stays deleted), and when RabbitMQ refuses a file it exits non-zero naming the
    file and records nothing, so the same definitions are imported at the next start."""
    import pika

    tree = _init_tree(tmp_path / "init")
    _as_root(_init_command(tree))
    suffix = f"-{vhost[-6:]}"
    marker = f"clusteralert_test_definitions_{vhost[-12:]}"
    base = Path(tempfile.mkdtemp(prefix="clusteralert-defs-"))
    base.chmod(0o755)
    definitions = base / "definitions"
    _definitions_for_vhost(tree / "rabbitmq-definitions", definitions, vhost, suffix)
    # Stands in for the default user a fresh broker seeds (the real guest is the tests').
    default_user = f"default{suffix}"
    subprocess.run(
        ["rabbitmqctl", "-q", "add_user", default_user, "pw"], check=True, capture_output=True
    )

    def run_import() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(IMPORT_SCRIPT), str(definitions), marker, default_user],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def exists(queue: str) -> bool:
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
            try:
                connection.channel().queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                return False
            return True

    try:
        first = run_import()
        assert first.returncode == 0, first.stdout + first.stderr
        assert all(exists(q.name) for q in QUEUES)
        password = (tree / "secrets" / "worker" / "worker_amqp_password").read_text()
        path = urllib.parse.quote(vhost, safe="")
        url = f"amqp://clusteralert-worker{suffix}:{password}@127.0.0.1:5672/{path}"
        pika.BlockingConnection(pika.URLParameters(url)).close()
        # RabbitMQ 3.10 imports topic permissions too (the worker's canary needs its own,
        # and the producer's keeps nodes from sending one), lookahead and all.
        topics = subprocess.run(
            ["rabbitmqctl", "-q", "list_topic_permissions", "-p", vhost, "--no-table-headers"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        assert sorted(tuple(line.split("\t")) for line in topics) == [
            (
                f"clusteralert-producer{suffix}",
                EVENTS_EXCHANGE,
                "^(?!clusteralert\\.[23]\\.)",
                "^$",
            ),
            (f"clusteralert-worker{suffix}", EVENTS_EXCHANGE, "^clusteralert\\.[23]\\.", "^#$"),
        ]
        assert f"removed RabbitMQ's default user {default_user}" in first.stdout
        users = subprocess.run(
            ["rabbitmqctl", "-q", "list_users", "--no-table-headers"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert default_user not in users.split()

        retry_queue = retry_queue_name(RETRY_DELAYS[0][0])
        with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
            connection.channel().queue_delete(retry_queue)
        again = run_import()
        assert again.returncode == 0, again.stderr
        assert "unchanged" in again.stdout
        assert not exists(retry_queue)  # nothing was imported

        # Definitions RabbitMQ refuses: a permission for a user nobody made.
        topology = definitions / "10-topology.json"
        imported = topology.read_text()
        defs = json.loads(imported)
        ghost = {**defs["permissions"][0], "user": f"clusteralert-ghost{suffix}"}
        defs["permissions"].append(ghost)
        topology.write_text(json.dumps(defs))
        failed = run_import()
        assert failed.returncode != 0
        assert "no_such_user" in failed.stderr and "10-topology.json" in failed.stderr
        # The failed import recorded nothing: the marker still names what was imported.
        topology.write_text(imported)
        assert "unchanged" in run_import().stdout
    finally:
        shutil.rmtree(base)
        cleanup = [["clear_global_parameter", marker]]
        cleanup += [
            ["delete_user", user + suffix]
            for user in ("clusteralert-producer", "clusteralert-worker", "admin", "default")
        ]
        running = [
            subprocess.Popen(
                ["rabbitmqctl", "-q", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for args in cleanup
        ]
        for process in running:
            process.wait(60)
