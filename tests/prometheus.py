"""Debian's Prometheus server, started as a real process for a test, and its query API."""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import Process, free_port

Query = Callable[[str], list[dict[str, object]]]


def installed(name: str, package: str) -> str:
    """The path of Debian's ``name`` program, or a failure naming its package."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's {package} package (scripts/test does)")
    return path


def start_prometheus(
    processes: Callable[..., Process], directory: Path, config: dict[str, object]
) -> Query:
    """``prometheus`` with ``config`` on a free port, its data in ``directory``; returns
    an instant query, which gives [] while the server is not up yet."""
    prometheus = installed("prometheus", "prometheus")
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    processes(
        Path(prometheus).name,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'tsdb'}",
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

    return query
