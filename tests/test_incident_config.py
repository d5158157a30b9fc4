"""``[incident]``: defaults, every key read, and bad values as one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import IncidentConfig, parse_config
from shared.errors import ConfigError
from tests.test_check_config import GOOD, check


def test_defaults_and_every_key() -> None:
    assert parse_config({}, sections=("incident",)).incident == IncidentConfig(
        group_wait=2.0,
        repeat_interval=3600.0,
        storm_threshold=10,
        storm_window=60.0,
        storm_by=("cluster",),
        max_held=50_000,
    )
    doc = {
        "incident": {
            "group_wait": 0,
            "repeat_interval": 60,
            "storm_threshold": 0,
            "storm_window": 10.5,
            "storm_by": ["cluster", "node", "key", "node"],
            "max_held": 1000,
        }
    }
    assert parse_config(doc, sections=("incident",)).incident == IncidentConfig(
        0.0, 60.0, 0, 10.5, ("cluster", "node", "key"), 1000
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"group_wait": -1}, "incident.group_wait: must be at least 0, got -1.0"),
        ({"storm_window": 0}, "incident.storm_window: must be at least 1, got 0.0"),
        # Held events stay unacked: past RabbitMQ's consumer timeout the broker takes them.
        ({"storm_window": 3600}, "incident.storm_window: must be at most 1200, got 3600.0"),
        ({"group_wait": 301}, "incident.group_wait: must be at most 300, got 301.0"),
        ({"storm_threshold": 1.5}, "incident.storm_threshold: expected an integer, got float 1.5"),
        ({"max_held": 0}, "incident.max_held: must be at least 1, got 0"),
        ({"storm_by": ["rack"]}, "incident.storm_by[0]: expected one of cluster, node, module"),
        ({"storm_by": []}, "incident.storm_by: at least one of cluster, node, module, key"),
        ({"storm_by": "cluster"}, "incident.storm_by: expected a list of strings"),
        ({"group_wiat": 1}, "incident.group_wiat: unknown key"),
    ],
)
def test_bad_values_are_one_line_errors(table: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"incident": table}, sections=("incident",))
    [problem] = caught.value.problems
    assert str(problem).startswith(expected) and "\n" not in str(problem)


def test_check_config_reports_incident_and_catalog_incident_keys(tmp_path: Path) -> None:
    catalog = tmp_path / "site.toml"
    catalog.write_text(
        '[[message]]\nmodule = "rm"\nevent_id = 26\nlevel = "info"\ntext = "x"\n'
        'resolves = ["rm9"]\n'
    )
    config = tmp_path / "c.toml"
    config.write_text(GOOD + f'[catalog]\npath = "{catalog}"\n[incident]\nstorm_by = ["rack"]\n')
    result = check(config)
    assert result.returncode == 1
    assert result.stdout.startswith(
        "incident.storm_by[0]: expected one of cluster, node, module, key, got 'rack'\n"
    )
    assert "message[0].resolves[0]: expected module:event_id, e.g. rm:9, got 'rm9'" in result.stdout
