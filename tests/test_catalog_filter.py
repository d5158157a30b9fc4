"""Catalog loading and the filter decision, in the documented order."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.catalog import Catalog, CatalogEntry, load_catalog, load_catalog_checked
from shared.config import FilterConfig
from shared.errors import ConfigError
from shared.event import new_event
from shared.filter import decide


def event(module: str, event_id: int, level: str | None = None) -> object:
    return new_event(
        module=module, event_id=event_id, cluster="c", node="n", source="t", level=level
    )


CATALOG = Catalog(
    [
        CatalogEntry("rm", 9, "error", True, "Monitor {1} failed"),
        CatalogEntry("rm", 10, "info", True, "Monitor {1} ok"),
        CatalogEntry("rm", 11, "error", False, "quiet"),
    ]
)


def check(module: str, event_id: int, level: str | None = None, **filters: object):  # type: ignore[no-untyped-def]
    return decide(event(module, event_id, level), CATALOG, FilterConfig(**filters))  # type: ignore[arg-type]


def test_disable_wins_over_everything() -> None:
    d = check("rm", 9, disable=("rm:*",), enable=("rm:9",))
    assert (d.mail, d.reason) == (False, "disabled")


def test_enable_overrides_catalog_flag_and_min_level() -> None:
    assert check("rm", 11, enable=("rm:11",)).mail
    assert check("rm", 10, enable=("rm:1?",), min_level="error").mail
    assert check("zz", 1, level="info", enable=("zz:*",)).mail


def test_catalog_flag_and_min_level() -> None:
    d = check("rm", 11)
    assert (d.mail, d.reason) == (False, "catalog")
    d = check("rm", 10, min_level="warning")
    assert (d.mail, d.reason, d.level) == (False, "min_level", "info")
    assert check("rm", 9, min_level="error").mail


def test_catalog_level_wins_over_the_events_level() -> None:
    d = check("rm", 10, level="error", min_level="warning")
    assert (d.mail, d.level) == (False, "info")


def test_unknown_events_follow_the_policy() -> None:
    assert check("zz", 1, level="error").mail
    d = check("zz", 1, level="warning")
    assert (d.mail, d.reason) == (False, "unknown")
    d = check("zz", 1)  # no level at all counts as info
    assert (d.mail, d.reason, d.level) == (False, "unknown", "info")
    assert check("zz", 1, level="info", unknown="info").mail
    assert not check("zz", 1, level="error", unknown="never").mail


def test_builtin_catalog_loads_and_layers(tmp_path: Path) -> None:
    builtin = load_catalog([])
    assert builtin.lookup("node", 1) is not None
    override = tmp_path / "site.toml"
    override.write_text(
        '[[message]]\nmodule = "node"\nevent_id = 1\nlevel = "warning"\nmail = false\n'
        'text = "site text"\n'
        '[[message]]\nmodule = "rm"\nevent_id = 9\nlevel = "error"\nmail = true\ntext = "x"\n'
    )
    layered = load_catalog([override])
    entry = layered.lookup("node", 1)
    assert entry is not None and (entry.text, entry.mail) == ("site text", False)
    assert layered.lookup("rm", 9) is not None
    assert layered.lookup("node", 2) == builtin.lookup("node", 2)


def test_broken_catalog_reports_every_problem(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[[message]]\nmodule = "rm"\nevent_id = "nine"\nlevel = "error"\ntext = "x"\n'
        '[[message]]\nmodule = "rm"\nevent_id = 1\nlevel = "fatal"\ntext = "x"\n'
        '[[message]]\nmodule = "rm"\nevent_id = 2\nlevel = "info"\ntext = "a"\n'
        '[[message]]\nmodule = "rm"\nevent_id = 2\nlevel = "info"\ntext = "b"\ncolor = 1\n'
        '[[message]]\nmodule = "rm"\nevent_id = 3\nlevel = "info"\ntext = "c"\n'
    )
    catalog, problems = load_catalog_checked([broken])
    found = [str(p) for p in problems]
    assert f"{broken}: message[0].event_id: expected an integer, got string 'nine'" in found
    assert any(p.startswith(f"{broken}: message[1].level: expected one of") for p in found)
    assert f"{broken}: message[3].color: unknown key" in found
    assert catalog.lookup("rm", 3) is not None  # good entries still load
    with pytest.raises(ConfigError):
        load_catalog([broken])


def test_duplicate_key_in_one_file(tmp_path: Path) -> None:
    dup = tmp_path / "dup.toml"
    dup.write_text(
        '[[message]]\nmodule = "rm"\nevent_id = 2\nlevel = "info"\ntext = "a"\n'
        '[[message]]\nmodule = "rm"\nevent_id = 2\nlevel = "info"\ntext = "b"\n'
    )
    _, problems = load_catalog_checked([dup])
    assert [str(p) for p in problems] == [
        f"{dup}: message[1]: rm:2 is already defined by message[0]"
    ]
