"""The EXPRESSCLUSTER/CLUSTERPRO alert destination list (a CSV with the columns
``Module type, Event type, Event ID, Message, Description, Solution, alert, syslog, mail,
SNMP Trap``) read as a catalog, as the vendor publishes it.

- Level from Event type, the mail flag from the ``mail`` column.
- ``%1``, ``%2``... become positional placeholders ``{1}``, ``{2}``...; printf tokens
  such as ``0x%08x`` stay literal text (:mod:`shared.placeholders`).
- Description and Solution (the suggested action) become plain text: HTML stripped,
  entities decoded.
- Rows repeating a key are merged: the highest level wins, mail is on if any row says so,
  the first text is used and the others are kept as alternates. Each merge is a warning
  with its line numbers.
- Malformed rows are reported with their line number and left out; the rest loads.
"""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser
from pathlib import Path
from typing import Final

from shared.catalog_entry import Catalog, CatalogEntry
from shared.errors import Problem
from shared.event import MODULE_RE
from shared.levels import Level, level_rank
from shared.placeholders import from_vendor

__all__ = ["html_to_text", "is_vendor_csv", "parse_vendor_csv"]

COLUMNS: Final = (
    "Module type",
    "Event type",
    "Event ID",
    "Message",
    "Description",
    "Solution",
    "mail",
)
_LEVELS: Final[dict[str, Level]] = {
    "info": "info",
    "information": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
}
_MAIL_ON: Final = {"1", "yes", "y", "true", "on", "x", "o", "\u25cb"}
_HEADER_START: Final = b"module type,"


def is_vendor_csv(path: Path, head: bytes) -> bool:
    """By extension, or by content for a list saved under another name."""
    return path.suffix.lower() == ".csv" or head.lstrip(b"\xef\xbb\xbf").lower().startswith(
        _HEADER_START
    )


class _TextExtractor(HTMLParser):
    _BREAKS: Final = {"br", "p", "div", "li", "tr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._BREAKS:
            self.parts.append("\n")


def html_to_text(fragment: str) -> str:
    """Plain text of an HTML fragment: tags dropped, entities decoded, blank runs folded."""
    parser = _TextExtractor()
    parser.feed(fragment)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _plain(value: str) -> str:
    text = html_to_text(value)
    return "" if text == "-" else text


def parse_vendor_csv(text: str, source: str, problems: list[Problem]) -> Catalog:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        problems.append(Problem(source, "empty file"))
        return Catalog()
    except csv.Error as exc:
        problems.append(Problem(f"{source}:1", f"not CSV: {exc}"))
        return Catalog()
    lowered = [name.lower() for name in header]
    missing = [c for c in COLUMNS if c.lower() not in lowered]
    if missing:
        problems.append(Problem(f"{source}:1", f"missing column(s): {', '.join(missing)}"))
        return Catalog()
    index = {c: lowered.index(c.lower()) for c in COLUMNS}

    merged: dict[tuple[str, int], CatalogEntry] = {}
    lines: dict[tuple[str, int], list[int]] = {}
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(Problem(f"{source}:{reader.line_num}", f"not CSV: {exc}"))
            break
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        entry = _row(row, header, index, f"{source}:{line}", problems)
        if entry is None:
            continue
        key = (entry.module, entry.event_id)
        lines.setdefault(key, []).append(line)
        merged[key] = _merge(merged[key], entry) if key in merged else entry

    for key, at in lines.items():
        if len(at) > 1:
            entry = merged[key]
            problems.append(
                Problem(
                    source,
                    f"{entry.key} appears on lines {', '.join(map(str, at))}; merged (level "
                    f"{entry.level}, mail {'on' if entry.mail else 'off'}, "
                    f"{len(entry.alternates)} alternate text(s))",
                    "warning",
                )
            )
    return Catalog(merged.values())


def _row(
    row: list[str], header: list[str], index: dict[str, int], where: str, problems: list[Problem]
) -> CatalogEntry | None:
    if len(row) != len(header):
        problems.append(Problem(where, f"expected {len(header)} fields, got {len(row)}"))
        return None
    module = row[index["Module type"]].strip().lower()
    if not MODULE_RE.fullmatch(module):
        problems.append(Problem(where, f"Module type {module!r:.40} must match [a-z0-9_-]{{1,32}}"))
        return None
    raw_id = row[index["Event ID"]].strip()
    if not (raw_id.isascii() and raw_id.isdigit()):
        problems.append(Problem(where, f"Event ID {raw_id!r:.20} is not a number"))
        return None
    level = _LEVELS.get(row[index["Event type"]].strip().lower())
    if level is None:
        problems.append(
            Problem(
                where, f"Event type {row[index['Event type']]!r:.20} is not Info, Warning or Error"
            )
        )
        return None
    return CatalogEntry(
        module=module,
        event_id=int(raw_id),
        level=level,
        mail=row[index["mail"]].strip().lower() in _MAIL_ON,
        # Some Message cells hold HTML too (line blocks, entities): one line of text.
        text=from_vendor(" ".join(_plain(row[index["Message"]]).split("\n"))),
        action=from_vendor(_plain(row[index["Solution"]])),
        description=from_vendor(_plain(row[index["Description"]])),
    )


def _merge(first: CatalogEntry, other: CatalogEntry) -> CatalogEntry:
    level = first.level if level_rank(first.level) >= level_rank(other.level) else other.level
    alternates = first.alternates
    if other.text != first.text and other.text not in alternates:
        alternates = (*alternates, other.text)
    return CatalogEntry(
        module=first.module,
        event_id=first.event_id,
        level=level,
        mail=first.mail or other.mail,
        text=first.text,
        action=first.action or other.action,
        description=first.description or other.description,
        alternates=alternates,
    )
