"""The vendor's message-list format, read as it is, on a fixture of our own that carries
every quirk of the published list: repeated keys with different levels and texts, HTML and
entities in cells, ``%1`` params beside printf tokens, empty cells, and CP932 bytes."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from shared.catalog import (
    Catalog,
    decode_csv,
    load_catalog,
    load_catalog_checked,
    parse_catalog,
)
from shared.config import FilterConfig, MailConfig
from shared.errors import Problem
from shared.event import new_event
from shared.filter import decide
from shared.vendor_csv import html_to_text, parse_vendor_csv
from tests.conftest import BIN
from tests.data import VENDOR_SAMPLE, vendor_list_path
from worker.render import Renderer

# Every list the CLI round trip runs on: our sample always, the vendor's full published list
# too when CLUSTERALERT_VENDOR_LIST names it (with its warning count and its rm:9 text).
LISTS = [pytest.param(VENDOR_SAMPLE, 2, "Monitor {1} reported a fault. ({2} : {3})", id="sample")]
if (_published := vendor_list_path()) is not None:
    LISTS.append(
        pytest.param(
            _published, 4, "Detected an error in monitoring {1}. ({2} : {3})", id="published"
        )
    )


@pytest.fixture(scope="module")
def vendor() -> tuple[Catalog, list[Problem]]:
    problems: list[Problem] = []
    text = VENDOR_SAMPLE.read_text(encoding="utf-8")
    return parse_vendor_csv(text, str(VENDOR_SAMPLE), problems), problems


def test_the_sample_loads_with_its_merges(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, problems = vendor
    assert len(catalog) == 11
    assert all(p.severity == "warning" for p in problems)
    assert [str(p).split(": ", 2)[2] for p in problems] == [
        "sra:301 appears on lines 10, 11, 12; merged (level error, mail off, 2 alternate text(s))",
        "mdadmn:2 appears on lines 13, 14; merged (level error, mail on, 1 alternate text(s))",
    ]
    assert sorted(f"{m}:{n}" for (m, n) in catalog if catalog[(m, n)].mail) == [
        "mdadmn:2",
        "nm:2",
        "pm:11",
        "pm:22",
        "rm:9",
    ]
    mdadmn = catalog.lookup("mdadmn", 2)
    assert mdadmn is not None and mdadmn.level == "error"  # Error beats Info, mail wins
    sra = catalog.lookup("sra", 301)
    assert sra is not None and len(sra.alternates) == 2
    empty = catalog.lookup("lamp", 6)
    assert empty is not None and (empty.description, empty.action) == ("", "")


def render(catalog: Catalog, module: str, event_id: int, **params: str) -> str:
    event = new_event(
        module=module, event_id=event_id, cluster="c", node="n1", source="t", params=params
    )
    decision = decide(event, catalog, FilterConfig())
    mail = Renderer(MailConfig(sender="a@example.com", to=("b@example.com",))).render(
        event, decision
    )
    return mail.data.decode("ascii")


def test_rm_9_renders_positional_params_and_the_action(
    vendor: tuple[Catalog, list[Problem]],
) -> None:
    catalog, _ = vendor
    data = render(catalog, "rm", 9, **{"1": "httpw", "2": "11", "3": "timeout"})
    assert "Subject: [error] c n1: Monitor httpw reported a fault. (11 : timeout)" in data
    assert "Suggested action:\r\nCheck the target of httpw.\r\nThen read the monitor log." in data


def test_printf_tokens_stay_literal(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, _ = vendor
    entry = catalog.lookup("apisv", 101)
    assert entry is not None and entry.text == "Cluster stop request failed(0x%08x)."
    assert "0x%08x" in render(catalog, "apisv", 101)
    lamp = catalog.lookup("lamp", 6)
    assert lamp is not None and "(%d)" in lamp.text


def assert_no_markup(catalog: Catalog) -> None:
    everything = "".join(
        catalog[k].action + catalog[k].description + catalog[k].text for k in catalog
    )
    for tag in ("<a ", "<span", "<div", "</", "&quot;", "&amp;"):
        assert tag not in everything


def test_html_in_cells_becomes_plain_text(vendor: tuple[Catalog, list[Problem]]) -> None:
    catalog, _ = vendor
    entry = catalog.lookup("pm", 22)
    assert entry is not None
    assert entry.action == 'Maybe the event process is not running yet. Read "Troubleshooting".'
    assert_no_markup(catalog)
    assert html_to_text("a&amp;b<br/>c&quot;") == 'a&b\nc"'
    mirror = catalog.lookup("mdctrl", 1)
    assert mirror is not None and mirror.text == "Mirror disk did not activate.{1} (Device:{2})"
    assert mirror.action == "Check the mirror disk & its network."


def test_a_cp932_list_loads_with_a_warning(tmp_path: Path) -> None:
    text = VENDOR_SAMPLE.read_text(encoding="utf-8").replace(
        "Cluster daemon is up.", "クラスタデーモンが起動しました。"
    )
    cp932 = tmp_path / "list-sjis.csv"
    cp932.write_bytes(text.encode("cp932"))
    catalog, problems = load_catalog_checked([cp932])
    assert f"warning: {cp932}: not UTF-8; read as CP932 (Shift_JIS)" in [str(p) for p in problems]
    entry = catalog.lookup("pm", 1)
    assert entry is not None and entry.text == "クラスタデーモンが起動しました。"


def test_decisions_follow_the_csv_layered_over_the_shipped_catalog() -> None:
    catalog = load_catalog([VENDOR_SAMPLE])
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


@pytest.mark.parametrize(("path", "warnings", "rm9"), LISTS)
def test_import_round_trips_every_decision(path: Path, warnings: int, rm9: str) -> None:
    result = subprocess.run(
        [str(BIN / "clusteralert-worker"), "catalog", "import", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning:") == warnings
    problems: list[Problem] = []
    imported = parse_catalog(tomllib.loads(result.stdout), "imported", problems)
    assert problems == []
    csv_catalog = parse_vendor_csv(decode_csv(path.read_bytes(), str(path), []), str(path), [])
    assert set(imported) == set(csv_catalog)
    for key in csv_catalog:
        assert imported[key] == csv_catalog[key], key
        event = new_event(module=key[0], event_id=key[1], cluster="c", node="n", source="t")
        for filters in (FilterConfig(), FilterConfig(min_level="error")):
            assert decide(event, imported, filters) == decide(event, csv_catalog, filters)


@pytest.mark.parametrize(("path", "warnings", "rm9"), LISTS)
def test_catalog_show_and_list_explain_decisions(
    tmp_path: Path, path: Path, warnings: int, rm9: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[catalog]\npath = "{path}"\n[filter]\ndisable = ["rm:9"]\n')

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
    assert f"text:        {rm9}" in shown
    assert "decision:    not mailed (rm:9 matches disable 'rm:9')" in shown
    listed = cli("list", "--mail-only", "--module", "pm").splitlines()
    assert listed and all(line.startswith("pm:") and " MAIL " in line for line in listed)
    unknown = cli("show", "zz:1", "--level", "error")
    assert "not in the catalog" in unknown and "decision:    mailed" in unknown
