"""``clusteralert-worker test-mail`` and ``check-config --probe`` against real TLS relays:
every step shown, the worker's TLS policy applied, nothing sent where it must not be, and
the password never printed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import trustme

from tests.conftest import BIN, Certs
from tests.pipeline import SMTP_PASSWORD, write_config
from tests.smtpserver import SmtpServer

Servers = Callable[..., SmtpServer]
CREDENTIALS = ("alert", SMTP_PASSWORD)


def worker_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clusteralert-worker"), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def steps(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines() if line.startswith("  ")]


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    assert SMTP_PASSWORD not in result.stdout + result.stderr


def test_test_mail_through_starttls_shows_every_step(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS)
    config = write_config(tmp_path, "unused", [relay], certs)
    result = worker_cli(config, "test-mail", "--to", "me@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps(result.stdout) == [
        "connect", "tls", "cert", "auth", "mail", "rcpt", "data", "ok"
    ]  # fmt: skip
    out = result.stdout
    assert "TLSv1.3" in out or "TLSv1.2" in out
    assert "(certificate and host name verified)" in out
    assert "issuer organizationName=trustme" in out and "days left)" in out
    assert "as alert: accepted" in out
    assert "TO:<me@example.com>: 250" in out
    [mail] = relay.received
    assert mail.tls and mail.auth_login == "alert"
    assert mail.rcpt_tos == ["me@example.com"]
    assert b"Subject: clusteralert test mail through 127.0.0.1:" in mail.data
    assert_no_secret(result)


def test_test_mail_through_smtps_to_the_configured_recipients(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    # The test relay offers AUTH only after STARTTLS, so this one runs without it.
    relay = smtp_server("smtps")
    config = write_config(tmp_path, "unused", [relay], certs, auth=False)
    result = worker_cli(config, "test-mail")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(smtps; test mail)" in result.stdout
    [mail] = relay.received
    assert mail.tls and mail.rcpt_tos == ["ops@example.com", "oncall@example.com"]


def test_a_relay_without_starttls_gets_nothing(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    relay = smtp_server("starttls", credentials=CREDENTIALS, context=None)
    config = write_config(tmp_path, "unused", [relay], certs)
    result = worker_cli(config, "test-mail")
    assert result.returncode == 1
    assert "FAILED    at tls: tls_refused: not_offered" in result.stdout
    assert relay.received == []
    assert_no_secret(result)


def test_a_relay_with_an_untrusted_certificate_gets_nothing(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    relay = smtp_server("starttls", context=certs.server_context(ca=trustme.CA()))
    config = write_config(tmp_path, "unused", [relay], certs, auth=False)
    result = worker_cli(config, "test-mail")
    assert result.returncode == 1
    assert "FAILED    at tls: tls_refused: verify" in result.stdout
    assert relay.received == []


def test_a_relay_refusing_auth_gets_no_mail_and_no_password_is_shown(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    relay = smtp_server("starttls", credentials=("alert", "another-password"))
    config = write_config(tmp_path, "unused", [relay], certs)
    result = worker_cli(config, "test-mail")
    assert result.returncode == 1
    assert "FAILED    at auth: auth: AUTH 535" in result.stdout
    assert relay.received == []
    assert_no_secret(result)


def test_probe_sends_nothing_and_fails_on_any_bad_relay(
    tmp_path: Path, certs: Certs, smtp_server: Servers
) -> None:
    good = smtp_server("starttls", credentials=CREDENTIALS)
    bad = smtp_server("starttls", credentials=CREDENTIALS, context=None)
    config = write_config(tmp_path, "unused", [good], certs, name="good.toml")
    result = worker_cli(config, "check-config", "--probe")
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps(result.stdout) == ["connect", "tls", "cert", "auth", "ok"]
    assert "relay is ready" in result.stdout
    both = write_config(tmp_path, "unused", [good, bad], certs, name="both.toml")
    result = worker_cli(both, "check-config", "--probe")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "the relay probe failed (see above)"
    assert result.stdout.count("relay is ready") == 1 and "FAILED    at tls" in result.stdout
    only_second = worker_cli(both, "test-mail", "--relay", "2")
    assert only_second.returncode == 1 and only_second.stdout.count("relay 127.0.0.1:") == 1
    assert good.received == [] and bad.received == []
    wrong = worker_cli(both, "test-mail", "--relay", "3")
    assert wrong.returncode == 1
    assert wrong.stderr == "clusteralert-worker: --relay: no relay 3: the config has 2, 1 to 2\n"
    not_an_address = worker_cli(both, "test-mail", "--to", "ops at example.com")
    assert not_an_address.returncode == 1 and not_an_address.stdout == ""
    assert not_an_address.stderr == (
        "clusteralert-worker: --to: not a plain e-mail address: 'ops at example.com'\n"
    )
