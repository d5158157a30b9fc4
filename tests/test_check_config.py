"""``clusteralert-worker check-config``: every problem printed, exit code by severity."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.conftest import BIN


def worker(command: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "clusteralert-worker"), command, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return worker("check-config", config)


GOOD = """
[mail]
from = "cluster@example.com"
to = ["ops@example.com"]
[[smtp]]
host = "smtp.example.com"
"""


def test_valid_config_exits_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    result = check(config)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""
    assert "0 error(s), 0 warning(s)" in result.stderr


def test_warnings_alone_exit_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD + 'security = "none"\n')
    result = check(config)
    assert result.returncode == 0
    assert result.stdout.startswith("warning: smtp[0].security: plaintext SMTP chosen")


def test_every_problem_in_config_and_catalog_is_printed(tmp_path: Path) -> None:
    catalog = tmp_path / "site.toml"
    catalog.write_text('[[message]]\nmodule = "rm"\nevent_id = 1\nlevel = "loud"\ntext = "x"\n')
    config = tmp_path / "c.toml"
    config.write_text(
        GOOD + f'security = "tls"\n[filter]\nmin_level = "debug"\n[catalog]\npath = "{catalog}"\n'
    )
    result = check(config)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "smtp[0].security: expected one of starttls, smtps, none, got 'tls'" in lines
    assert "filter.min_level: expected one of info, warning, error, got 'debug'" in lines
    assert any(line.startswith(f"{catalog}: message[0].level: expected one of") for line in lines)
    assert "3 error(s)" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.toml")
    assert result.returncode == 1
    assert "config file not found" in result.stdout


def test_a_follower_whose_unknown_kinds_would_be_filtered_is_warned_about(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.toml"
    followers = """
[[producer.follow]]
path = "/var/log/messages"
[[producer.follow]]
path = "/var/log/app.log"
level = "error"
[[producer.follow]]
path = "/var/log/levelled.log"
patterns = ['<type: (?P<module>[a-z]+)><event: (?P<event_id>[0-9]+)><(?P<level>[a-z]+)>']
"""
    config.write_text(GOOD + followers)
    result = check(config)
    assert result.returncode == 0, result.stdout
    [warning] = result.stdout.splitlines()
    assert warning.startswith(
        "warning: producer.follow[0]: events from /var/log/messages of kinds not in the "
        "catalog have level info, and [filter] unknown = 'error' filters them"
    )
    config.write_text(GOOD + followers + '[filter]\nunknown = "info"\n')
    assert check(config).stdout == ""


def test_a_metrics_port_out_of_range_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    result = worker("run", config, "--metrics-port", "99999")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith("99999 is not a port (0 to 65535)")


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    """A second worker on one host finds the first one's metrics port taken."""
    config = tmp_path / "c.toml"
    config.write_text(GOOD)
    with socket.create_server(("0.0.0.0", 0)) as taken:  # noqa: S104 - as the worker binds
        port = taken.getsockname()[1]
        result = worker("run", config, "--metrics-port", str(port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"clusteralert-worker: cannot serve metrics on port {port}: Address already in use"
    )
