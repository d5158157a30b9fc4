"""Config loading: every problem reported with its path, secrets never shown."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.config import load_config, parse_config
from shared.errors import ConfigError


def problems(text: str, tmp_path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), base=tmp_path, **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


MINIMAL = """
[mail]
from = "cluster@example.com"
to = ["ops@example.com"]
[[smtp]]
host = "smtp.example.com"
"""


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(MINIMAL), base=tmp_path)
    relay = config.smtp[0]
    assert (relay.port, relay.security, relay.max_connections) == (587, "starttls", 4)
    assert config.filter.unknown == "error"
    assert config.mail.domain == "example.com"
    assert config.metrics.port == 9464


def test_bad_values_are_reported_with_their_path(tmp_path: Path) -> None:
    found = problems(
        MINIMAL
        + """
security = "tls"
port = "25"
colour = "blue"
[filter]
min_level = "debug"
enable = ["rm:*", "pm:1"]
disable = ["pm:1", "not a key"]
[metrics]
port = 70000
[worker]
prefetch = true
event_loop = "trio"
""",
        tmp_path,
    )
    assert "smtp[0].security: expected one of starttls, smtps, none, got 'tls'" in found
    assert "smtp[0].port: expected an integer, got string '25'" in found
    assert "smtp[0].colour: unknown key" in found
    assert "worker.event_loop: expected one of uvloop, asyncio, got 'trio'" in found
    assert "filter.min_level: expected one of info, warning, error, got 'debug'" in found
    assert "filter.enable: 'pm:1' is in both enable and disable" in found
    assert any(p.startswith("filter.disable[1]: expected module:event_id") for p in found)
    assert "metrics.port: must be at most 65535, got 70000" in found
    assert "worker.prefetch: expected an integer, got a boolean" in found


def test_unknown_section_and_missing_relay(tmp_path: Path) -> None:
    found = problems('[mail]\nfrom = "a@b.c"\nto = "x@y.z"\n[smpt]\nhost = "x"\n', tmp_path)
    assert "smpt: unknown key" in found
    assert "smtp: at least one [[smtp]] relay is required" in found


def test_header_injection_through_addresses_is_refused(tmp_path: Path) -> None:
    found = problems(
        '[mail]\nfrom = "a@b.c\\r\\nBcc: x@evil"\nto = ["ok@x.y", "Ops <o@x.y>"]\n'
        '[[smtp]]\nhost = "h"\n',
        tmp_path,
    )
    assert any(p.startswith("mail.from: not a plain e-mail address") for p in found)
    assert any(p.startswith("mail.to[1]: not a plain e-mail address") for p in found)


def test_secrets_come_from_files_and_stay_hidden(tmp_path: Path) -> None:
    (tmp_path / "smtp_pw").write_text("s3cret-smtp\n")
    (tmp_path / "amqp_pw").write_text("s3cret-amqp\r\n")
    config = parse_config(
        tomllib.loads(
            MINIMAL
            + 'username = "alert"\npassword_file = "smtp_pw"\n'
            + '[broker]\nurls = ["amqp://worker:inline-pw@rabbit:5672/%2F"]\n'
            + 'password_file = "amqp_pw"\n'
        ),
        base=tmp_path,
    )
    relay = config.smtp[0]
    assert relay.password is not None and relay.password.reveal() == "s3cret-smtp"
    url = config.broker.urls[0]
    assert url.password is not None and url.password.reveal() == "s3cret-amqp"
    assert url.vhost == "/"
    shown = repr(config) + str(config) + str(url)
    for secret in ("s3cret-smtp", "s3cret-amqp", "inline-pw"):
        assert secret not in shown
    assert url.with_secret() == "amqp://worker:s3cret-amqp@rabbit:5672/%2F"


def test_inline_smtp_password_and_missing_secret_file(tmp_path: Path) -> None:
    found = problems(
        MINIMAL + 'username = "u"\npassword = "hunter2"\n'
        '[[smtp]]\nhost = "h2"\nusername = "u"\npassword_file = "missing"\n',
        tmp_path,
    )
    assert "smtp[0].password: put the password in a file and name it in password_file" in found
    assert any(p.startswith("smtp[1].password_file: cannot read") for p in found)
    assert not any("hunter2" in p for p in found)


def test_a_malformed_url_does_not_leak_its_password(tmp_path: Path) -> None:
    found = problems(
        '[broker]\nurls = ["amqp://user:s3cr/3t@host/"]\n', tmp_path, sections=("broker",)
    )
    assert found == [
        "broker.urls[0]: not a valid URL (percent-encode special characters in the password)"
    ]


def test_non_ascii_addresses_are_refused(tmp_path: Path) -> None:
    found = problems(
        '[mail]\nfrom = "alertü@example.com"\nto = "o@x.y"\n[[smtp]]\nhost="h"\n', tmp_path
    )
    assert any(p.startswith("mail.from: not a plain e-mail address") for p in found)


def test_broker_url_errors_do_not_echo_the_url(tmp_path: Path) -> None:
    found = problems('[broker]\nurls = ["http://u:topsecret@h/"]\n', tmp_path, sections=("broker",))
    assert found == ["broker.urls[0]: scheme must be amqp or amqps, got 'http'"]


def test_plaintext_smtp_is_a_warning(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(MINIMAL + 'security = "none"\n'), base=tmp_path)
    assert [str(w) for w in config.warnings] == [
        "warning: smtp[0].security: plaintext SMTP chosen: mail and any password travel unencrypted"
    ]
    assert config.smtp[0].port == 25


def test_producer_reads_only_its_sections(tmp_path: Path) -> None:
    # A node has no SMTP password file; the producer must not trip over the worker's part.
    text = MINIMAL + 'username = "u"\npassword_file = "/nonexistent"\n[producer]\ncluster="c9"\n'
    config = parse_config(tomllib.loads(text), base=tmp_path, sections=("producer",))
    assert config.producer.cluster == "c9"


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[producer]\ncluster = "from-env"\nspool_dir = "spool"\n')
    monkeypatch.setenv("CLUSTERALERT_CONFIG", str(path))
    config = load_config(None, sections=("producer",))
    assert config.producer.cluster == "from-env"
    assert config.producer.spool_dir == tmp_path / "spool"
    monkeypatch.setenv("CLUSTERALERT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None)


def test_invalid_toml_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[mail\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert len(info.value.problems) == 1
    assert "not valid TOML" in str(info.value.problems[0])


# Every table of the config, with the smallest valid body, and where its keys are reported.
TABLES = {
    "": ("", ""),
    "broker": ("[broker]\n", "broker."),
    "producer": ("[producer]\n", "producer."),
    "producer.follow": ('[[producer.follow]]\npath = "/var/log/x"\n', "producer.follow[0]."),
    "mail": ('[mail]\nfrom = "a@example.com"\nto = ["b@example.com"]\n', "mail."),
    "smtp": ('[[smtp]]\nhost = "smtp.example.com"\n', "smtp[0]."),
    "route": ('[[route]]\nto = ["c@example.com"]\n', "route[0]."),
    "filter": ("[filter]\n", "filter."),
    "catalog": ("[catalog]\n", "catalog."),
    "metrics": ("[metrics]\n", "metrics."),
    "worker": ("[worker]\n", "worker."),
    "canary": ("[canary]\n", "canary."),
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_an_unknown_key_is_an_error_in_every_table(table: str, tmp_path: Path) -> None:
    body, where = TABLES[table]
    rest = "".join(b for name, (b, _) in TABLES.items() if name not in ("", table))
    if table == "producer.follow":  # [producer] must come first, then its array
        rest = rest.replace(TABLES["producer"][0], "")
        body = TABLES["producer"][0] + body
    # Top-level keys must precede every table in TOML.
    text = (body + "colour = 1\n" + rest) if table else ("colour = 1\n" + rest)
    assert problems(text, tmp_path) == [f"{where}colour: unknown key"]


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "huge"])
def test_a_secret_file_that_never_ends_is_a_clear_error_not_a_hang(
    kind: str, tmp_path: Path
) -> None:
    """A password_file pointing at /dev/zero, a FIFO nobody writes, or a huge file must
    not stall the worker's start (or eat its memory): one clear error instead."""
    import os
    import subprocess

    from tests.conftest import BIN

    if kind == "dev_zero":
        secret = Path("/dev/zero")
    elif kind == "fifo":
        secret = tmp_path / "fifo"
        os.mkfifo(secret)
    else:
        secret = tmp_path / "huge"
        with secret.open("wb") as fh:
            fh.truncate(1 << 30)  # sparse: a gigabyte of nothing, cheap to make
    config = tmp_path / "c.toml"
    config.write_text(MINIMAL + f'password_file = "{secret}"\n')
    result = subprocess.run(
        [str(BIN / "clusteralert-worker"), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    [line] = [
        x for x in result.stdout.splitlines() + result.stderr.splitlines() if str(secret) in x
    ]
    assert line.startswith("smtp[0].password_file: "), line


@pytest.mark.parametrize(
    ("raw", "scheme", "host", "port", "vhost", "user", "shown", "full"),
    [
        (
            "amqp://h",
            "amqp",
            "h",
            5672,
            "/",
            "guest",
            "amqp://guest@h:5672/%2F",
            "amqp://guest@h:5672/%2F",
        ),
        (
            "amqps://rabbit.example/",
            "amqps",
            "rabbit.example",
            5671,
            "/",
            "guest",
            "amqps://guest@rabbit.example:5671/%2F",
            "amqps://guest@rabbit.example:5671/%2F",
        ),
        (
            "amqps://a%40b:p%3Aw%2Fd@h:5999/prod%2Fvh",
            "amqps",
            "h",
            5999,
            "prod/vh",
            "a@b",
            "amqps://a@b@h:5999/prod%2Fvh",
            "amqps://a%40b:p%3Aw%2Fd@h:5999/prod%2Fvh",
        ),
    ],
)
def test_broker_urls_take_their_defaults_and_round_trip(
    raw: str,
    scheme: str,
    host: str,
    port: int,
    vhost: str,
    user: str,
    shown: str,
    full: str,
    tmp_path: Path,
) -> None:
    config = parse_config({"broker": {"urls": [raw]}}, sections=("broker",), base=tmp_path)
    [url] = config.broker.urls
    assert (url.scheme, url.host, url.port, url.vhost, url.username) == (
        scheme,
        host,
        port,
        vhost,
        user,
    )
    assert str(url) == shown  # for logs: never the password
    assert url.with_secret() == full  # for the client library: everything, re-quoted
    if ":" in raw.split("//", 1)[1].split("@", 1)[0]:
        assert url.password is not None and url.password.reveal() == "p:w/d"
    else:
        assert url.password is None


def test_a_broker_url_without_a_host_is_an_error(tmp_path: Path) -> None:
    found = problems('[broker]\nurls = ["amqp:///vh"]\n', tmp_path, sections=("broker",))
    assert found == ["broker.urls[0]: no host name"]


def test_load_config_reports_a_missing_named_file_and_bad_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert [str(p) for p in info.value.problems] == [f"{missing}: config file not found"]
    # Named by the environment counts as named too.
    monkeypatch.setenv("CLUSTERALERT_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert [str(p) for p in info.value.problems] == [f"{missing}: config file not found"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[mail\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad))
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith(f"{bad}: not valid TOML: ")
    # Relative paths are taken from the config file's directory, not the caller's.
    good = tmp_path / "sub" / "good.toml"
    good.parent.mkdir()
    good.write_text('[producer]\nspool_dir = "spool"\n')
    monkeypatch.chdir("/")
    assert load_config(str(good), sections=("producer",)).producer.spool_dir == (
        good.parent / "spool"
    )
    assert load_config(str(good), sections=("producer",)).path == good


# (table, key, default, lowest, highest, how to read it back); None: no upper bound.
BOUNDS: list[tuple[str, str, float, float, float | None, Any]] = [
    ("smtp", "port", 587, 1, 65535, lambda c: c.smtp[0].port),
    ("smtp", "timeout", 30.0, 0.1, 600, lambda c: c.smtp[0].timeout),
    ("smtp", "max_connections", 4, 1, 100, lambda c: c.smtp[0].max_connections),
    ("smtp", "cooldown", 30.0, 0, 3600, lambda c: c.smtp[0].cooldown),
    ("smtp", "rate_limit", 0.0, 0, 100_000, lambda c: c.smtp[0].rate_limit),
    ("broker", "heartbeat", 30, 0, 3600, lambda c: c.broker.heartbeat),
    ("broker", "connect_timeout", 10.0, 0.1, 300, lambda c: c.broker.connect_timeout),
    ("producer", "max_events", 10_000, 0, None, lambda c: c.producer.max_events),
    ("producer", "max_bytes", 100 * 1024 * 1024, 0, None, lambda c: c.producer.max_bytes),
    ("producer", "metrics_port", 0, 0, 65535, lambda c: c.producer.metrics_port),
    ("producer", "heartbeat_interval", 60.0, 0, 86400, lambda c: c.producer.heartbeat_interval),
    ("metrics", "port", 9464, 0, 65535, lambda c: c.metrics.port),
    ("worker", "prefetch", 32, 1, 10_000, lambda c: c.worker.prefetch),
    ("worker", "shutdown_grace", 30.0, 0, 3600, lambda c: c.worker.shutdown_grace),
    ("worker", "retry_window", 3600.0, 0, 7 * 86400, lambda c: c.worker.retry_window),
]


def with_value(table: str, key: str, value: object | None) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads(MINIMAL)
    target: dict[str, Any] = data["smtp"][0] if table == "smtp" else data.setdefault(table, {})
    if value is not None:
        target[key] = value
    return data


@pytest.mark.parametrize(
    ("table", "key", "default", "low", "high", "read"),
    BOUNDS,
    ids=[f"{t}.{k}" for t, k, *_ in BOUNDS],
)
def test_numeric_keys_have_their_default_and_exact_bounds(
    table: str,
    key: str,
    default: float,
    low: float,
    high: float | None,
    read: Any,
    tmp_path: Path,
) -> None:
    assert read(parse_config(with_value(table, key, None), base=tmp_path)) == default
    step = 1 if isinstance(low, int) and isinstance(default, int) else 0.01
    edges = [low] + ([high] if high is not None else [])
    for ok in edges:
        assert read(parse_config(with_value(table, key, ok), base=tmp_path)) == ok
    outside = [low - step] + ([high + step] if high is not None else [])
    where = "smtp[0]" if table == "smtp" else table
    for bad in outside:
        with pytest.raises(ConfigError) as info:
            parse_config(with_value(table, key, bad), base=tmp_path)
        [problem] = [str(p) for p in info.value.problems]
        assert problem.startswith(f"{where}.{key}: "), problem


@pytest.mark.parametrize(("security", "port"), [("smtps", 465), ("starttls", 587), ("none", 25)])
def test_the_default_smtp_port_follows_the_security(
    security: str, port: int, tmp_path: Path
) -> None:
    config = parse_config(with_value("smtp", "security", security), base=tmp_path)
    assert config.smtp[0].port == port


def test_a_follower_reads_every_key(tmp_path: Path) -> None:
    from shared.config import CLUSTERPRO_PATTERN, FollowConfig

    config = parse_config(
        tomllib.loads(
            '[[producer.follow]]\npath = "logs/app.log"\npatterns = "^(?P<message>.*)$"\n'
            'module = "app"\nevent_id = 0\nlevel = "warning"\n'
            '[[producer.follow]]\npath = "/var/log/other.log"\n'
        ),
        base=tmp_path,
        sections=("producer",),
    )
    assert config.producer.follow == (
        FollowConfig(tmp_path / "logs/app.log", ("^(?P<message>.*)$",), "app", 0, "warning"),
        FollowConfig(Path("/var/log/other.log"), (CLUSTERPRO_PATTERN,), None, None, None),
    )


def test_a_followers_mistakes_are_reported_where_they_are(tmp_path: Path) -> None:
    found = problems(
        "[[producer.follow]]\n"
        'patterns = ["(", "^(?P<message>.*)$"]\nevent_id = -1\nlevel = "loud"\n',
        tmp_path,
        sections=("producer",),
    )
    where = "producer.follow[0]"
    assert f"{where}.path: missing" in found
    assert any(
        p.startswith(f"{where}.patterns[0]: not a valid regular expression: ") for p in found
    )
    assert (
        f"{where}.patterns[1]: has no (?P<module>...) group and no module is set for this follower"
        in found
    )
    assert any(p.startswith(f"{where}.event_id: ") for p in found), found
    assert any(p.startswith(f"{where}.level: expected one of info, warning, error") for p in found)


def test_a_route_reads_every_key(tmp_path: Path) -> None:
    from shared.config import Route

    config = parse_config(
        tomllib.loads(
            MINIMAL
            + '[[route]]\nto = "db@example.com"\nmatch = "db:*"\nmin_level = "error"\n'
            + '[[route]]\nto = ["all@example.com"]\n'
        ),
        base=tmp_path,
    )
    assert config.routes == (
        Route(to=("db@example.com",), match=("db:*",), min_level="error"),
        Route(to=("all@example.com",), match=(), min_level="info"),
    )


def test_mail_broker_and_catalog_read_every_key(tmp_path: Path) -> None:
    from shared.config import DEFAULT_SUBJECT, MailConfig

    config = parse_config(
        tomllib.loads(
            '[mail]\nfrom = "a@example.com"\nto = "b@example.com"\nsubject = "{level}"\n'
            'charset = "iso-2022-jp"\nsubject_encode = false\nhtml = true\n'
            '[broker]\nurls = ["amqps://h/"]\nca_file = "ca.pem"\ncert_file = "/c.pem"\n'
            'key_file = "k.pem"\n'
            '[catalog]\npath = "site.toml"\n'
        ),
        base=tmp_path,
        sections=("mail", "broker", "catalog"),
    )
    assert config.mail == MailConfig(
        sender="a@example.com",
        to=("b@example.com",),
        subject="{level}",
        charset="iso-2022-jp",
        subject_encode=False,
        html=True,
    )
    broker = config.broker
    assert (broker.ca_file, broker.cert_file, broker.key_file) == (
        tmp_path / "ca.pem",
        Path("/c.pem"),
        tmp_path / "k.pem",
    )
    assert config.catalog.paths == (tmp_path / "site.toml",)
    defaults = parse_config(
        {"mail": {"to": ["b@example.com"]}, "catalog": {"path": ["a.csv", "", "/b.toml"]}},
        base=tmp_path,
        sections=("mail", "catalog"),
    )
    assert (defaults.mail.subject, defaults.mail.charset) == (DEFAULT_SUBJECT, "utf-8")
    assert (defaults.mail.subject_encode, defaults.mail.html) == (True, False)
    assert defaults.catalog.paths == (tmp_path / "a.csv", Path("/b.toml"))


def test_mail_and_broker_mistakes_are_reported_where_they_are(tmp_path: Path) -> None:
    found = problems(
        '[mail]\nfrom = "Ops <a@example.com>"\nto = []\nsubject = "a\\nb"\ncharset = "ebcdic"\n'
        '[broker]\nurls = []\ncert_file = "c.pem"\n',
        tmp_path,
        sections=("mail", "broker"),
    )
    assert "mail.from: not a plain e-mail address: 'Ops <a@example.com>'" in found
    assert "mail.to: at least one recipient is required" in found
    assert "mail.subject: must be one line" in found
    assert any(p.startswith("mail.charset: expected one of utf-8, ") for p in found), found
    assert "broker.urls: at least one broker URL is required" in found
    assert "broker.cert_file: cert_file and key_file must be given together" in found


def test_the_canary_is_off_until_it_has_a_recipient(tmp_path: Path) -> None:
    off = parse_config(tomllib.loads(MINIMAL), base=tmp_path).canary
    assert (off.interval, off.to) == (0, ())
    on = parse_config(
        tomllib.loads(MINIMAL + '[canary]\nto = "canary@example.com"\n'), base=tmp_path
    )
    assert (on.canary.interval, on.canary.to) == (300, ("canary@example.com",))
    quiet = MINIMAL + '[canary]\nto = "canary@example.com"\ninterval = 0\n'
    assert parse_config(tomllib.loads(quiet), base=tmp_path).canary.interval == 0


@pytest.mark.parametrize("interval", [0.001, 0.5, 0.99])
def test_heartbeats_are_off_or_at_most_one_a_second(interval: float, tmp_path: Path) -> None:
    """0.001 would be a thousand heartbeats a second from each node agent."""
    [found] = problems(MINIMAL + f"[producer]\nheartbeat_interval = {interval}\n", tmp_path)
    assert found == "producer.heartbeat_interval: must be 0 (no heartbeats) or at least 1 second"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("interval = 60", "canary.to: a recipient is required when interval is above 0"),
        ('interval = 0.5\nto = "c@example.com"', "canary.interval: must be 0 (no canary) or"),
        ('interval = 90000\nto = "c@example.com"', "canary.interval: "),
        ('to = ["c@example.com", "x\\r\\nBcc: y@example.com"]', "canary.to[1]: not a plain"),
        ("to = 3", "canary.to: "),
    ],
)
def test_a_bad_canary_is_one_line_each(table: str, problem: str, tmp_path: Path) -> None:
    [found] = problems(MINIMAL + "[canary]\n" + table + "\n", tmp_path)
    assert found.startswith(problem), found
    assert "\n" not in found
