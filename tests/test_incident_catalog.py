"""Catalog ``identity`` and ``resolves``: read, checked, written back, shown, and set in
the shipped catalog so that every node's report of one failure is one incident."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from shared.catalog import catalog_to_toml, load_catalog, load_catalog_checked, parse_catalog
from shared.errors import Problem
from tests.conftest import BIN

ENTRY = {"module": "rm", "event_id": 9, "level": "error", "mail": True, "text": "t {monitor}"}


def parse(**extra: object) -> tuple[list[Problem], object]:
    problems: list[Problem] = []
    catalog = parse_catalog({"message": [{**ENTRY, **extra}]}, "my.toml", problems)
    return problems, catalog


def test_identity_and_resolves_are_read_and_written_back() -> None:
    problems, catalog = parse(identity=["node", "monitor", "node"], resolves=["rm:7", "mm:905"])
    assert problems == []
    entry = catalog.lookup("rm", 9)  # type: ignore[attr-defined]
    assert entry.identity == ("node", "monitor") and entry.resolves == ("rm:7", "mm:905")
    again: list[Problem] = []
    back = parse_catalog(tomllib.loads(catalog_to_toml(catalog)), "x", again)  # type: ignore[arg-type]
    assert again == [] and back.lookup("rm", 9) == entry
    # Absent: every param (and node) is identity; an empty list is allowed and means
    # one incident per cluster.
    _, plain = parse()
    assert plain.lookup("rm", 9).identity is None  # type: ignore[attr-defined]
    assert "identity" not in catalog_to_toml(plain)  # type: ignore[arg-type]
    _, empty = parse(identity=[])
    assert empty.lookup("rm", 9).identity == ()  # type: ignore[attr-defined]


def test_bad_identity_and_resolves_are_one_line_errors() -> None:
    cases = [
        ({"identity": "monitor"}, "my.toml: message[0].identity: expected a list of strings"),
        ({"identity": ["a b"]}, "my.toml: message[0].identity[0]: not a param name"),
        ({"resolves": ["rm9"]}, "my.toml: message[0].resolves[0]: expected module:event_id"),
        ({"resolves": ["RM:9x"]}, "my.toml: message[0].resolves[0]: expected module:event_id"),
        ({"resolves": ["rm:9"]}, "my.toml: message[0].resolves[0]: rm:9 cannot resolve itself"),
    ]
    for extra, expected in cases:
        problems, catalog = parse(**extra)
        assert [str(p).startswith(expected) for p in problems] == [True], (extra, problems)
        assert "\n" not in str(problems[0])
        assert len(catalog) == 0  # type: ignore[arg-type]


def test_shipped_catalog_merges_and_threads_out_of_the_box() -> None:
    catalog, problems = load_catalog_checked([])
    assert problems == []
    # Every node's report of one node loss or fencing is one incident: the identity
    # names the lost node, not the reporter's params (recipient, node_sequence...).
    assert catalog.lookup("pacemaker", 1).identity == ("node",)  # type: ignore[union-attr]
    assert catalog.lookup("pacemaker", 12).identity == ("node", "action")  # type: ignore[union-attr]
    pairs = {
        ("pacemaker", 2): "pacemaker:1",
        ("pacemaker", 21): "pacemaker:22",
        ("pacemaker", 11): "pacemaker:12",
        ("rm", 26): "rm:9",
        ("nm", 1): "nm:2",
        ("mm", 26): "mm:905",
        ("node", 2): "node:1",
        ("monitor", 2): "monitor:1",
        ("keepalived", 1): "keepalived:3",
        ("keepalived", 2): "keepalived:3",
    }
    for (module, event_id), failure in pairs.items():
        entry = catalog.lookup(module, event_id)
        assert entry is not None and failure in entry.resolves, (module, event_id)
    for key in catalog:
        entry = catalog[key]
        for target in entry.resolves:
            module, _, number = target.partition(":")
            failure = catalog.lookup(module, int(number))
            # A recovery can only find its failure if it carries the failure's identity.
            assert failure is not None and failure.identity is not None, target
            assert set(failure.identity) <= set(entry.identity or ()), (entry.key, target)


def test_catalog_show_prints_identity_and_resolves(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    shown = subprocess.run(
        [str(BIN / "clusteralert-worker"), "catalog", "show", "rm:26", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "identity:    node, monitor\n" in shown and "resolves:    rm:9\n" in shown
    assert load_catalog([]).lookup("rm", 26) is not None
