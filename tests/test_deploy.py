"""The deploy files are right by construction: compose validated against the Compose
Specification, the broker's definitions equal to the topology in shared/, Prometheus
config and rules checked by promtool, and every metric the dashboard and the rules use
exported by a real worker. No Docker engine runs here, so these are the checks we have."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from shared.config import parse_config
from shared.topology import (
    BINDINGS,
    DEAD_QUEUE,
    DLX_EXCHANGE,
    EVENTS_EXCHANGE,
    EXCHANGES,
    QUEUES,
    RETRY_DELAYS,
    RETRY_EXCHANGE,
    WORK_QUEUE,
    retry_queue_name,
)
from tests.conftest import BIN, Certs, Process, amqp_url, free_port, scrape, wait_metric
from tests.pipeline import dlq, publish_events, start_worker, write_config
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
            for part in re.split(r"&&|exec ", " ".join(command)):
                words = shlex.split(part)
                if words:
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
    permissions: user name to AMQP URL."""
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    users = {p["user"]: p for p in defs["permissions"]}
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


def _publish_event(url: str, event_id: str, routing_key: str = "node.1.n") -> None:
    """One valid event to the events exchange as ``url``'s user, confirmed."""
    import pika

    body = json.dumps(
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


def test_least_privilege_permissions_are_enough_and_no_more(
    definition_users: dict[str, str],
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Users with exactly the definitions' permissions run the real pipeline, and the
    producer's user can do nothing but publish events."""
    import pika

    relay = smtp_server("starttls")
    config = _config_as(definition_users["clusteralert-worker"], tmp_path, vhost, relay, certs)
    start_worker(processes, config)
    producer_url = definition_users["clusteralert-producer"]
    _publish_event(producer_url, "6f1c7f4e-4b7e-4a8e-9d55-0f4c3bfe2a10")
    assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
    # And nothing else: reading or declaring is refused for the producer.
    params = pika.URLParameters(producer_url)
    refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
    with pika.BlockingConnection(params) as connection, refused:
        connection.channel().basic_get("clusteralert.mail")
    refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
    with pika.BlockingConnection(params) as connection, refused:
        connection.channel().queue_declare("clusteralert.sneaky")


def test_worker_permissions_are_the_minimum_its_operations_need() -> None:
    """Derived from the topology with RabbitMQ's rules: declaring needs configure on the
    name, and a queue with a dead-letter exchange also write on that exchange and read
    on the queue; binding needs write on the queue and read on the exchange; consuming
    and the DLQ commands read their queue; retries, dead letters and replays write to
    clusteralert.retry, clusteralert.dlx and the default exchange (amq.default). The
    events exchange is not among them: only producers publish events."""
    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    perms = {p["user"]: p for p in defs["permissions"]}["clusteralert-worker"]
    need: dict[str, set[str]] = {
        "configure": {e.name for e in EXCHANGES} | {q.name for q in QUEUES},
        "write": {RETRY_EXCHANGE, DLX_EXCHANGE, "amq.default"},
        "read": {WORK_QUEUE, DEAD_QUEUE},
    }
    for queue in QUEUES:
        if "x-dead-letter-exchange" in queue.arguments:
            need["write"].add(str(queue.arguments["x-dead-letter-exchange"]) or "amq.default")
            need["read"].add(queue.name)
    for binding in BINDINGS:
        need["write"].add(binding.queue)
        need["read"].add(binding.exchange)
    assert EVENTS_EXCHANGE not in need["write"]
    others = {"amq.default", "amq.topic", "clusteralert.incoming", "clusteralert.sneaky"}
    candidates = need["configure"] | others
    for kind, needed in need.items():
        # RabbitMQ searches (re:run) rather than matching the whole name.
        allowed = {name for name in candidates if re.search(perms[kind], name)}
        assert allowed == needed, f"{kind}: {sorted(allowed ^ needed)}"


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
    can no longer publish to clusteralert.events."""
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

    refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
    with pika.BlockingConnection(pika.URLParameters(worker_url)) as connection, refused:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("clusteralert.events", "node.1.n", b"{}", mandatory=True)


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
    exported = {re.sub(r"\{.*", "", k) for k in scrape(port)}
    # The node agent's own endpoint (the spool rules use it).
    agent_port = free_port()
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        config.read_text().replace("[producer]", f"[producer]\nmetrics_port = {agent_port}")
    )
    processes("clusteralert-producer", "run", "--config", str(agent_config))
    wait_until(lambda: scrape(agent_port), 30, "the node agent's metrics")
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
        for t in p["targets"]
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
    web = free_port()
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "clusteralert-worker",
                        "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                    }
                ],
            }
        )
    )
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is missing: install Debian's prometheus package")
    processes(
        Path(prometheus).name,
        f"--config.file={prom_config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web}",
        bin_dir=Path(prometheus).parent,
    )

    def query(expr: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                result: list[dict[str, object]] = json.load(response)["data"]["result"]
                return result
        except OSError:
            return []

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


# The users the images run as: ours from deploy/Dockerfile; Grafana's image runs as 472;
# RabbitMQ's entrypoint drops to its rabbitmq user (999); Mailpit's image runs as root.
_OUR_UID = re.search(r"--uid (\d+)", (DEPLOY / "Dockerfile").read_text())
assert _OUR_UID is not None
IMAGE_USERS = {
    "clusteralert": int(_OUR_UID.group(1)),
    "grafana/grafana": 472,
    "rabbitmq": 999,
    "axllent/mailpit": 0,
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
    return paths


def _as_root(script: str, env: dict[str, str] | None = None) -> str:
    """Run ``script`` as root: for real when we are, else under fakeroot."""
    command = ["sh", "-c", script] if os.geteuid() == 0 else ["fakeroot", "sh", "-c", script]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _run_init(tree: Path) -> dict[str, tuple[int, int, str]]:
    """Run deploy/dev/init.sh in ``tree``, which mirrors the init container's mounts, as
    on a first start and then a restart (keeping a copy of what the first start made in
    ``tree``/../first), and list every path in the tree as (uid, mode, type). Under
    fakeroot when we are not root, which fakes only the owners."""
    init = _compose_services()["init"]
    for source, target, _ in _mounts(init):
        path = tree / target.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if source.startswith("./"):
            path.symlink_to(ROOT / source)
        else:
            path.mkdir()  # a fresh named volume: an empty directory
    run = f"sh {shlex.quote(str(tree / 'init.sh'))} >/dev/null"
    first = shlex.quote(str(tree.parent / "first"))
    script = (
        f"{run} && cp -a {shlex.quote(str(tree / 'secrets'))} {first} && {run} && "
        f"find {shlex.quote(str(tree))} -mindepth 1 -printf '%P\\t%U\\t%m\\t%y\\n'"
    )
    listing = {}
    for line in _as_root(script, env={"INIT_ROOT": str(tree)}).splitlines():
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
    # RabbitMQ gets salted hashes of the very passwords the services read (and the
    # operator's admin password); the restart kept every password.
    users = json.loads((tree / "rabbitmq-definitions" / "00-users.json").read_text())["users"]
    hashes = {u["name"]: u["password_hash"] for u in users}
    for user in ("clusteralert-producer", "clusteralert-worker", "admin"):
        path = secret(user.removeprefix("clusteralert-") + "_amqp_password")
        password = path.read_text()
        assert _hash_matches(hashes[user], password), user
        assert (tmp_path / "first" / path.relative_to(secrets)).read_text() == password, user


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
