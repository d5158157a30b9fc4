"""The vendor's full published message list, taken as it is.

The list carries no licence, so it is not in the repository: these tests are collected only
when ``CLUSTERALERT_VENDOR_LIST`` names a copy (see tests/conftest.py). The same rules are
checked on every run against tests/fixtures/vendor_sample.csv."""

from __future__ import annotations

import re

import pytest

from shared.catalog import Catalog, builtin_catalog
from shared.errors import Problem
from shared.vendor_csv import parse_vendor_csv
from tests.data import vendor_list
from tests.test_clusterpro_catalog import RECOVERIES
from tests.test_vendor_csv import assert_no_markup, render


@pytest.fixture(scope="module")
def vendor() -> tuple[Catalog, list[Problem]]:
    problems: list[Problem] = []
    path = vendor_list()
    return parse_vendor_csv(path.read_text(encoding="utf-8"), str(path), problems), problems


def test_the_published_list_loads_with_its_merges(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, problems = vendor
    assert len(catalog) == 745
    assert all(p.severity == "warning" for p in problems)
    merges = sorted(str(p).split(": ", 2)[2].split(" appears")[0] for p in problems)
    assert merges == ["mdadmn:2", "sra:301", "sra:302", "sra:304"]
    assert any(
        "sra:301 appears on lines 733, 734, 735, 736, 737, 738, 739" in str(p) for p in problems
    )
    assert sum(1 for key in catalog if catalog[key].mail) == 14
    mdadmn = catalog.lookup("mdadmn", 2)
    assert mdadmn is not None and mdadmn.level == "error"  # Error beats Info
    sra = catalog.lookup("sra", 301)
    assert sra is not None and len(sra.alternates) == 6


def test_rm_9_renders_the_monitor_and_the_detail(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, _ = vendor
    data = render(catalog, "rm", 9, **{"1": "httpw", "2": "11", "3": "timeout"})
    assert "Subject: [error] c n1: Detected an error in monitoring httpw. (11 : timeout)" in data
    assert 'Suggested action:\r\nSee "Detailed info of monitor resource errors".' in data


def test_printf_tokens_stay_literal(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, _ = vendor
    key = next(k for k in catalog if "0x%08x" in catalog[k].text)
    assert "0x%08x" in render(catalog, *key)


def test_html_in_solutions_becomes_plain_text(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, _ = vendor
    entry = catalog.lookup("pm", 22)
    assert entry is not None
    assert entry.action == 'The event process may not yet have been started. See "Troubleshooting".'
    assert_no_markup(catalog)
    mirror = catalog.lookup("mdctrl", 1)
    assert mirror is not None and mirror.text == "Failed to activate mirror disk.{1} (Device:{2})"


def test_shipped_clusterpro_entries_agree_with_the_published_list(
    vendor: tuple[Catalog, list[Problem]],
) -> None:
    """Our CLUSTERPRO entries use our own words, but their levels, mail flags and logged
    wording are facts of the vendor's list: check each against it."""
    published, _ = vendor
    problems: list[Problem] = []
    shipped = builtin_catalog(problems)
    checked = 0
    for key in shipped:
        entry = shipped[key]
        if not entry.log_text:
            continue
        theirs = published.lookup(*key)
        assert theirs is not None, key
        assert entry.level == theirs.level, key
        assert entry.mail == theirs.mail or key in RECOVERIES, key
        shape = re.sub(r"\{\w+\}", "{}", entry.log_text)
        assert shape == re.sub(r"\{\w+\}", "{}", theirs.text), key
        checked += 1
    assert checked >= 30
