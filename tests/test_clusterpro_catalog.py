"""The shipped catalog knows CLUSTERPRO's event kinds, so a followed CLUSTERPRO log is
mailed out of the box, with named params recovered from the logged wording."""

from __future__ import annotations

import tomllib

import pytest

from shared.catalog import builtin_catalog, catalog_to_toml, parse_catalog
from shared.config import FilterConfig
from shared.errors import Problem
from shared.event import new_event
from shared.filter import decide
from shared.placeholders import render_template

# Every kind the vendor's alert list marks for mail, with the vendor's level.
VENDOR_MAILED = {
    ("pm", 11): "error",
    ("pm", 13): "error",
    ("pm", 20): "error",
    ("pm", 22): "error",
    ("nm", 2): "info",
    ("nm", 10): "error",
    ("nm", 20): "error",
    ("rc", 32): "error",
    ("rc", 42): "error",
    ("rc", 92): "error",
    ("rm", 7): "error",
    ("rm", 9): "error",
    ("rm", 57): "error",
    ("mm", 905): "error",
}
# Recoveries of mailed failures: mailed too, so a failure mail gets its all-clear.
RECOVERIES = {("nm", 1), ("rm", 26), ("mm", 26)}


@pytest.mark.parametrize(("key", "level"), sorted(VENDOR_MAILED.items()))
def test_every_kind_the_vendor_mails_is_mailed_by_default(key: tuple[str, int], level: str) -> None:
    problems: list[Problem] = []
    catalog = builtin_catalog(problems)
    entry = catalog.lookup(*key)
    assert entry is not None, key
    assert (entry.level, entry.mail) == (level, True)
    assert entry.log_text, "match-back needs the logged wording"
    # Unknown events without a level are filtered; these must not be.
    event = new_event(module=key[0], event_id=key[1], cluster="c", node="n", source="follow")
    assert decide(event, catalog, FilterConfig()).mail


def test_recoveries_are_mailed_and_other_kinds_keep_the_vendor_flags() -> None:
    problems: list[Problem] = []
    catalog = builtin_catalog(problems)
    clusterpro = [catalog[k] for k in catalog if k[0] in {"pm", "nm", "rc", "rm", "mm"}]
    assert len(clusterpro) >= 30
    for entry in clusterpro:
        key = (entry.module, entry.event_id)
        assert entry.mail == (key in VENDOR_MAILED or key in RECOVERIES), key
        assert entry.action, key


def test_named_params_from_the_logged_wording_fill_our_text() -> None:
    problems: list[Problem] = []
    entry = builtin_catalog(problems).lookup("rm", 9)
    assert entry is not None
    assert entry.log_text == "Detected an error in monitoring {monitor}. ({code} : {detail})"
    text = render_template(
        entry.text, {"monitor": "httpw", "code": "11", "detail": "timeout", "node": "srv1"}
    )
    assert text == "Monitor httpw on srv1 found an error: timeout (code 11)."


def test_log_text_survives_an_export_round_trip() -> None:
    problems: list[Problem] = []
    catalog = builtin_catalog(problems)
    again = parse_catalog(tomllib.loads(catalog_to_toml(catalog)), "export", problems)
    assert problems == []
    assert dict(again.items()) == dict(catalog.items())
    entry = again.lookup("rc", 32)
    assert entry is not None and entry.log_text.startswith("Activating {resource} resource")
