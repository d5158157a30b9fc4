"""The pipeline's own alerts reach a person out of band: Prometheus sends its rules to an
Alertmanager, which mails through its own SMTP settings, not through clusteralert. The
shipped Alertmanager config passes amtool, the compose wiring is checked statically, and
a real Prometheus, worker and Alertmanager (Debian's packages) carry one alert from a
broken relay to a mailbox."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import Certs, Process, free_port, scrape
from tests.pipeline import SMTP_PASSWORD, publish_events, start_worker, write_config
from tests.prometheus import Query, installed, start_prometheus
from tests.smtpserver import SmtpServer
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clusteralert.json"
# Our own services: the path the pipeline's mail takes (the broker, the worker).
PIPELINE_IMAGES = ("clusteralert", "rabbitmq")


def _services() -> dict[str, dict[str, object]]:
    services: dict[str, dict[str, object]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_the_shipped_alertmanager_config_passes_amtool() -> None:
    amtool = installed("amtool", "prometheus-alertmanager")
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_alerts_go_to_the_alertmanager_service() -> None:
    services = _services()
    alertmanager = services["alertmanager"]
    image = str(alertmanager["image"])
    assert image.startswith("prom/alertmanager:v"), image  # a pinned release
    mounted = {t: s for s, t, *_ in (str(v).split(":") for v in alertmanager["volumes"])}  # type: ignore[attr-defined]
    assert mounted["/etc/alertmanager/alertmanager.yml"] == "./deploy/alertmanager/alertmanager.yml"
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = [
        target
        for manager in config["alerting"]["alertmanagers"]
        for static in manager["static_configs"]
        for target in static["targets"]
    ]
    # Alertmanager's default port, which the healthcheck and the published port use too.
    assert targets == ["alertmanager:9093"]
    assert "127.0.0.1:9093:9093" in alertmanager["ports"]  # type: ignore[operator]


def test_alertmanager_mails_by_its_own_smtp_settings_not_through_the_pipeline() -> None:
    """Its smarthost is no service of the pipeline's, it starts without the broker and
    the worker, and it reads neither the worker's config nor its secrets."""
    services = _services()
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    host, port = config["global"]["smtp_smarthost"].rsplit(":", 1)
    assert host in services and int(port) > 0
    ours = {
        name
        for name, service in services.items()
        if str(service.get("image", "")).startswith(PIPELINE_IMAGES) or "build" in service
    }
    assert {"worker", "producer", "rabbitmq"} <= ours
    assert host not in ours
    alertmanager = services["alertmanager"]
    assert not set(alertmanager["depends_on"]) & (ours - {"init"})  # type: ignore[arg-type]
    volumes = " ".join(alertmanager["volumes"])  # type: ignore[arg-type]
    assert "secrets-worker" not in volumes and "clusteralert.toml" not in volumes
    # Mail to a person, over verified TLS (smtp_require_tls defaults to true; say it).
    assert config["global"]["smtp_require_tls"] is True
    [receiver] = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    [email] = receiver["email_configs"]
    assert email["to"] and email["tls_config"]["ca_file"].startswith("/secrets/")


def test_every_rule_has_a_runbook_line_in_the_deploy_readme() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    runbook = readme.split("## Alerts on the pipeline", 1)[1].split("\n## ", 1)[0]
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"] if "alert" in r):
        rows = [line for line in runbook.splitlines() if line.startswith(f"| `{rule['alert']}` |")]
        assert len(rows) == 1, rule["alert"]
        assert rows[0].split(" | ")[1] == rule.get("for", "none (each one is news)"), rows[0]
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], rule["alert"]


def _test_rules(path: Path, alert: str) -> None:
    """The shipped ``alert`` rule alone, with a ``for:`` of one second."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    [rule] = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    rule["for"] = "1s"
    path.write_text(yaml.safe_dump({"groups": [{"name": "test", "rules": [rule]}]}))


def _out_of_band(
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
    worker_port: int,
    alert: str,
) -> tuple[SmtpServer, Query]:
    """A real Alertmanager (the shipped config, its relay moved to a test relay of its own,
    waits shortened) and a real Prometheus (the shipped alerting section pointed at it)
    scraping the worker on ``worker_port`` with the shipped rule ``alert`` alone. Returns
    Alertmanager's relay and Prometheus's query."""
    alertmanager = installed("prometheus-alertmanager", "prometheus-alertmanager")
    oob_relay = smtp_server("starttls")
    am_config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    am_config["global"]["smtp_smarthost"] = f"127.0.0.1:{oob_relay.port}"
    am_config["route"].update(group_wait="1s", group_interval="1s")
    [email] = am_config["receivers"][0]["email_configs"]
    email["tls_config"] = {"ca_file": str(certs.ca_file), "server_name": "127.0.0.1"}
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    am_port = free_port()
    processes(
        Path(alertmanager).name,
        f"--config.file={tmp_path / 'alertmanager.yml'}",
        f"--storage.path={tmp_path / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{am_port}",
        "--cluster.listen-address=",  # no gossip with other Alertmanagers
        bin_dir=Path(alertmanager).parent,
    )

    _test_rules(tmp_path / "rules.yml", alert)
    prom_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    prom_config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_config["rule_files"] = [str(tmp_path / "rules.yml")]
    prom_config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{am_port}"]}
    ]
    prom_config["scrape_configs"] = [
        {
            "job_name": "clusteralert-worker",
            "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
        }
    ]
    query = start_prometheus(processes, tmp_path, prom_config)
    wait_until(lambda: query("up == 1"), 30, "Prometheus scraping the worker")
    return oob_relay, query


def _the_alert_mail(oob_relay: SmtpServer, alert: str) -> str:
    """The one out-of-band mail, over TLS to the on-call address: its HTML body."""
    assert oob_relay.wait_for(lambda got: len(got) == 1, timeout=45), "no out-of-band mail"
    [mail] = oob_relay.received
    assert mail.tls and mail.rcpt_tos == ["oncall@example.com"]
    message = mail.parsed()
    assert alert in str(message["Subject"]), message["Subject"]
    html = message.get_body(("html",))
    assert html is not None
    text: str = html.get_content()
    return text


def test_a_relay_refusing_auth_is_mailed_out_of_band_by_alertmanager(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """The relay's password was revoked: the worker's AUTH is refused, so clusteralert
    cannot mail anything. Prometheus sees the failures, ClusteralertRelayFailing fires,
    and Alertmanager mails it over STARTTLS to a relay of its own."""
    broken = smtp_server("starttls", credentials=("alert", "a-new-password"))
    worker_config = write_config(tmp_path, vhost, [broken], certs)
    _, worker_port = start_worker(processes, worker_config)
    # The counters must be seen at zero first, for increase() to see them rise.
    oob_relay, _ = _out_of_band(
        tmp_path, certs, smtp_server, processes, worker_port, "ClusteralertRelayFailing"
    )
    publish_events(vhost, 1)
    html = _the_alert_mail(oob_relay, "ClusteralertRelayFailing")
    assert "No relay accepted a mail in 10 minutes" in html  # the summary
    assert broken.received == []  # clusteralert itself got nothing through
    assert scrape(worker_port)['clusteralert_mails_failed_total{reason="auth"}'] >= 1


def test_a_stale_canary_is_mailed_out_of_band_by_alertmanager(
    vhost: str,
    tmp_path: Path,
    certs: Certs,
    smtp_server: Callable[..., SmtpServer],
    processes: Callable[..., Process],
) -> None:
    """The canary gets through every 2 s, then the relay's password is revoked: no canary
    gets through, ClusteralertCanaryStale fires (3 intervals, 6 s) and Alertmanager
    mails it over a relay of its own. Not before: while canaries flow it stays quiet, and
    the dashboard shows the canary's age and a node agent's last heartbeat."""
    relay = smtp_server("starttls", credentials=("alert", SMTP_PASSWORD))
    extra = '[canary]\ninterval = 2\nto = ["canary@example.com"]'
    worker_config = write_config(tmp_path, vhost, [relay], certs, extra=extra)
    _, worker_port = start_worker(processes, worker_config)
    agent_config = tmp_path / "node-a.toml"
    agent_config.write_text(
        worker_config.read_text().replace(
            "[producer]", '[producer]\nnode = "node-a"\nheartbeat_interval = 1'
        )
    )
    processes("clusteralert-producer", "run", "--config", str(agent_config))
    oob_relay, query = _out_of_band(
        tmp_path, certs, smtp_server, processes, worker_port, "ClusteralertCanaryStale"
    )
    # Several canaries seen by Prometheus, and the rule quiet meanwhile.
    first = wait_until(
        lambda: query("clusteralert_canary_last_success_timestamp_seconds > 0"),
        30,
        "Prometheus seeing a canary get through",
    )
    success = float(first[0]["value"][1])  # type: ignore[index]
    wait_until(
        lambda: query(f"clusteralert_canary_last_success_timestamp_seconds > {success + 6}"),
        30,
        "Prometheus seeing canaries 6 s later",
    )
    assert query('ALERTS{alertname="ClusteralertCanaryStale"}') == []
    assert oob_relay.received == []
    # The dashboard's canary and node panels answer from these workers' metrics.
    panels = {
        p["title"]: p["targets"][0]["expr"].replace("$instance", ".*")
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if "targets" in p
    }
    [age] = query(panels["Canary age"])
    assert 0 <= float(age["value"][1]) < 10  # type: ignore[index]
    [silence] = wait_until(
        lambda: query(panels["Node agents: seconds since last heartbeat"]),
        30,
        "the node panel answering",
    )
    assert silence["metric"] == {"cluster": "prod-cluster", "node": "node-a"}
    assert 0 <= float(silence["value"][1]) < 10  # type: ignore[index]

    relay.credentials = ("alert", "a-new-password")
    relay.go_down()
    relay.come_back()
    html = _the_alert_mail(oob_relay, "ClusteralertCanaryStale")
    assert "No canary mail got through for" in html  # the summary
    assert scrape(worker_port)['clusteralert_mails_failed_total{reason="auth"}'] >= 1
