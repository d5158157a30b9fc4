"""The vendor's published message list, taken as it is."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from shared.catalog import Catalog, load_catalog, load_catalog_checked, parse_catalog
from shared.config import FilterConfig, MailConfig
from shared.errors import Problem
from shared.event import new_event
from shared.filter import decide
from shared.vendor_csv import html_to_text, parse_vendor_csv
from tests.conftest import BIN
from tests.data import shared_data
from worker.render import Renderer

CSV = "X42_alertDestList_org.csv"


@pytest.fixture(scope="module")
def vendor() -> tuple[Catalog, list[Problem]]:
    problems: list[Problem] = []
    path = shared_data(CSV)
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


def render(catalog: Catalog, module: str, event_id: int, **params: str) -> str:
    event = new_event(
        module=module, event_id=event_id, cluster="c", node="n1", source="t", params=params
    )
    decision = decide(event, catalog, FilterConfig())
    mail = Renderer(MailConfig(sender="a@example.com", to=("b@example.com",))).render(
        event, decision
    )
    return mail.data.decode("ascii")


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
    everything = "".join(
        catalog[k].action + catalog[k].description + catalog[k].text for k in catalog
    )
    for tag in ("<a ", "<span", "<div", "</", "&quot;", "&amp;"):
        assert tag not in everything
    assert html_to_text("a&amp;b<br/>c&quot;") == 'a&b\nc"'
    mirror = catalog.lookup("mdctrl", 1)
    assert mirror is not None and mirror.text == "Failed to activate mirror disk.{1} (Device:{2})"


def test_decisions_follow_the_csv_layered_over_the_shipped_catalog() -> None:
    catalog = load_catalog([shared_data(CSV)])
    assert catalog.lookup("pacemaker", 12) is not None  # shipped entries survive
    mailed = decide(
        new_event(module="rm", event_id=9, cluster="c", node="n", source="t"),
        catalog,
        FilterConfig(),
    )
    assert mailed.mail
    quiet = decide(
        new_event(module="pm", event_id=1, cluster="c", node="n", source="t", level="error"),
        catalog,
        FilterConfig(),
    )
    assert (quiet.mail, quiet.reason, quiet.level) == (False, "catalog", "info")


def test_broken_csv_reports_line_numbers(tmp_path: Path) -> None:
    header = (
        "Module type,Event type,Event ID,Message,Description,Solution,alert,syslog,mail,SNMP Trap"
    )
    broken = tmp_path / "broken.csv"
    broken.write_text(
        "\n".join(
            [
                header,
                "rm,Error,nine,Bad id,d,s,1,1,1,1",
                "rm,Fatal,1,Bad level,d,s,1,1,1,1",
                "rm,Error,2,Too few fields",
                "Bad Module!,Error,3,x,d,s,1,1,1,1",
                "rm,Error,4,ok,d,s,1,1,1,1",
                "rm,Info,4,ok again,d,s,1,1,,1",
            ]
        )
        + "\n"
    )
    catalog, problems = load_catalog_checked([broken])
    found = [str(p) for p in problems]
    assert f"{broken}:2: Event ID 'nine' is not a number" in found
    assert f"{broken}:3: Event type 'Fatal' is not Info, Warning or Error" in found
    assert f"{broken}:4: expected 10 fields, got 4" in found
    assert any(p.startswith(f"{broken}:5: Module type") for p in found)
    assert any("rm:4 appears on lines 6, 7; merged (level error, mail on" in p for p in found)
    entry = catalog.lookup("rm", 4)
    assert entry is not None and entry.alternates == ("ok again",)
    missing = tmp_path / "missing.csv"
    missing.write_text("Module type,Event ID,Message\nrm,1,x\n")
    _, problems = load_catalog_checked([missing])
    assert [str(p) for p in problems] == [
        f"{missing}:1: missing column(s): Event type, Description, Solution, mail"
    ]


def test_import_round_trips_every_decision(
    tmp_path: Path, vendor: tuple[Catalog, list[Problem]]
) -> None:
    result = subprocess.run(
        [str(BIN / "clusteralert-worker"), "catalog", "import", str(shared_data(CSV))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning:") == 4
    problems: list[Problem] = []
    imported = parse_catalog(tomllib.loads(result.stdout), "imported", problems)
    assert problems == []
    csv_catalog, _ = vendor
    assert set(imported) == set(csv_catalog)
    for key in csv_catalog:
        assert imported[key] == csv_catalog[key], key
        event = new_event(module=key[0], event_id=key[1], cluster="c", node="n", source="t")
        for filters in (FilterConfig(), FilterConfig(min_level="error")):
            assert decide(event, imported, filters) == decide(event, csv_catalog, filters)


def test_catalog_show_and_list_explain_decisions(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[catalog]\npath = "{shared_data(CSV)}"\n[filter]\ndisable = ["rm:9"]\n')

    def cli(*args: str) -> str:
        result = subprocess.run(
            [str(BIN / "clusteralert-worker"), "catalog", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    shown = cli("show", "rm:9")
    assert "text:        Detected an error in monitoring {1}. ({2} : {3})" in shown
    assert "decision:    not mailed (rm:9 matches disable 'rm:9')" in shown
    listed = cli("list", "--mail-only", "--module", "pm").splitlines()
    assert listed and all(line.startswith("pm:") and " MAIL " in line for line in listed)
    unknown = cli("show", "zz:1", "--level", "error")
    assert "not in the catalog" in unknown and "decision:    mailed" in unknown
