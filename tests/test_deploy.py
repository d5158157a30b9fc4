"""The deploy files are right by construction: compose validated against the Compose
Specification, the broker's definitions equal to the topology in shared/, Prometheus
config and rules checked by promtool, and every metric the dashboard and the rules use
exported by a real worker. No Docker engine runs here, so these are the checks we have."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from compose_spec import PyCompose

from shared.config import parse_config
from shared.topology import BINDINGS, EXCHANGES, QUEUES
from tests.conftest import Certs, Process, free_port, scrape
from tests.pipeline import publish_events, start_worker, write_config
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


def test_least_privilege_permissions_are_enough_and_no_more(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """Users with exactly the definitions' permissions run the real pipeline, and the
    producer's user can do nothing but publish events."""
    import pika

    defs = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    users = {p["user"]: p for p in defs["permissions"]}
    assert set(users) == {"clusteralert-producer", "clusteralert-worker"}
    init = (DEPLOY / "dev" / "init.sh").read_text()
    assert all(f'"name": "{user}"' in init for user in users)
    names = {}
    for user, perms in users.items():
        name = f"{user}-{vhost[-6:]}"
        names[user] = name
        subprocess.run(
            ["rabbitmqctl", "-q", "add_user", name, "pw-" + name], check=True, capture_output=True
        )
        subprocess.run(
            [
                "rabbitmqctl",
                "-q",
                "set_permissions",
                "-p",
                vhost,
                name,
                perms["configure"],
                perms["write"],
                perms["read"],
            ],
            check=True,
            capture_output=True,
        )
    try:
        relay = smtp_server("starttls")
        worker_url = f"amqp://{names['clusteralert-worker']}:pw-{names['clusteralert-worker']}@127.0.0.1:5672/{vhost}"
        producer_url = f"amqp://{names['clusteralert-producer']}:pw-{names['clusteralert-producer']}@127.0.0.1:5672/{vhost}"
        config = write_config(tmp_path, vhost, [relay], certs, auth=False)
        worker_config = tmp_path / "worker.toml"
        worker_config.write_text(
            config.read_text()
            .replace('password_file = "amqp_password"', "")
            .replace(f"amqp://guest@127.0.0.1:5672/{vhost}", worker_url)
        )
        start_worker(processes, worker_config)
        params = pika.URLParameters(producer_url)
        with pika.BlockingConnection(params) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            body = json.dumps(
                {
                    "v": 1,
                    "id": "6f1c7f4e-4b7e-4a8e-9d55-0f4c3bfe2a10",
                    "time": "2026-11-26T03:00:00Z",
                    "cluster": "c",
                    "node": "n",
                    "module": "node",
                    "event_id": 1,
                    "params": {"server": "s"},
                    "source": "t",
                }
            ).encode()
            channel.basic_publish("clusteralert.events", "node.1.n", body, mandatory=True)
        assert relay.wait_for(lambda got: len(got) == 1, timeout=30)
        # And nothing else: reading or declaring is refused for the producer.
        refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
        with pika.BlockingConnection(params) as connection, refused:
            connection.channel().basic_get("clusteralert.mail")
        refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="403")
        with pika.BlockingConnection(params) as connection, refused:
            connection.channel().queue_declare("clusteralert.sneaky")
    finally:
        for name in names.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True)


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
    from tests.conftest import amqp_url
    from worker.consume import connect_any
    from worker.declare import declare_topology

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
