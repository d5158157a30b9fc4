"""The message catalog: which event kinds exist, their level, whether they are mailed,
and the text and suggested action of the mail.

Catalogs are TOML files of ``[[message]]`` tables, layered in order over the catalog
shipped with clusteralert (later files win per key), so an operator's file only needs the
entries it changes.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Final

from shared.catalog_entry import Catalog, CatalogEntry
from shared.errors import ConfigError, Problem
from shared.event import MODULE_RE, PARAM_KEY_RE
from shared.levels import LEVELS
from shared.tables import Table
from shared.vendor_csv import is_vendor_csv, parse_vendor_csv

__all__ = [
    "BUILTIN_NAME",
    "Catalog",
    "CatalogEntry",
    "catalog_to_toml",
    "load_catalog",
    "parse_catalog",
]

BUILTIN_NAME: Final = "builtin_catalog.toml"
_KEY_RE: Final = re.compile(r"[a-z0-9_-]{1,32}:[0-9]{1,18}")


def parse_catalog(data: object, source: str, problems: list[Problem]) -> Catalog:
    """Read ``[[message]]`` tables. Bad entries are reported (with their index) and left
    out; the rest of the file still loads."""
    root = Table(data, "", problems)
    entries: list[CatalogEntry] = []
    seen: dict[tuple[str, int], int] = {}
    for table in root.tables("message"):
        table.path = f"{source}: {table.path}"
        before = len(problems)
        module = table.text("module")
        event_id = table.integer("event_id", low=0)
        level = table.choice("level", LEVELS)
        entry_mail = table.flag("mail", False)
        text = table.text("text")
        action = table.text("action", "")
        description = table.text("description", "")
        alternates = table.str_list("alternates", ())
        log_text = table.text("log_text", "")
        identity = table.str_list("identity", None)
        resolves = table.str_list("resolves", ())
        table.finish()
        if isinstance(module, str) and not MODULE_RE.fullmatch(module):
            table.error("module", f"{module!r:.40} must match [a-z0-9_-]{{1,32}}")
        _check_incident_keys(table, identity, resolves, f"{module}:{event_id}")
        if len(problems) > before:
            continue
        key = (module, event_id)
        if key in seen:
            table.error("", f"{module}:{event_id} is already defined by message[{seen[key]}]")
            continue
        seen[key] = len(entries)
        entries.append(
            CatalogEntry(
                module,
                event_id,
                level,
                entry_mail,
                text,
                action,
                description,
                alternates,
                log_text,
                None if identity is None else tuple(dict.fromkeys(identity)),
                tuple(dict.fromkeys(resolves)),
            )
        )
    root.finish()
    return Catalog(entries)


def _check_incident_keys(
    table: Table, identity: tuple[str, ...] | None, resolves: tuple[str, ...], own: str
) -> None:
    """``identity`` names params; ``resolves`` names other kinds as ``module:event_id``."""
    for i, name in enumerate(identity or ()):
        if not PARAM_KEY_RE.fullmatch(name):
            table.error(f"identity[{i}]", f"not a param name (letters, digits, _): {name!r:.60}")
    for i, key in enumerate(resolves):
        if not _KEY_RE.fullmatch(key):
            table.error(f"resolves[{i}]", f"expected module:event_id, e.g. rm:9, got {key!r:.60}")
        elif key == own:
            table.error(f"resolves[{i}]", f"{key} cannot resolve itself")


def _read_file(path: Path, problems: list[Problem]) -> Catalog:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(str(path), f"cannot read catalog: {exc.strerror}"))
        return Catalog()
    if is_vendor_csv(path, raw[:64]):
        return parse_vendor_csv(decode_csv(raw, str(path), problems), str(path), problems)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "not UTF-8 text"))
        return Catalog()
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem(str(path), f"not valid TOML: {exc}"))
        return Catalog()
    return parse_catalog(data, str(path), problems)


def decode_csv(raw: bytes, source: str, problems: list[Problem]) -> str:
    """UTF-8 (with or without BOM); else the Japanese Windows code page that
    CLUSTERPRO's Japanese lists use, with a warning; never silent replacement."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp932")
    except UnicodeDecodeError:
        problems.append(Problem(source, "neither UTF-8 nor CP932 text; bad bytes replaced"))
        return raw.decode("utf-8", errors="replace")
    problems.append(Problem(source, "not UTF-8; read as CP932 (Shift_JIS)", "warning"))
    return text


def builtin_catalog(problems: list[Problem]) -> Catalog:
    text = resources.files("shared").joinpath(BUILTIN_NAME).read_text(encoding="utf-8")
    return parse_catalog(tomllib.loads(text), BUILTIN_NAME, problems)


def load_catalog_checked(paths: Iterable[Path]) -> tuple[Catalog, list[Problem]]:
    """The shipped catalog with each file layered over it, and every problem found."""
    problems: list[Problem] = []
    catalog = builtin_catalog(problems)
    for path in paths:
        catalog = catalog.layered(_read_file(path, problems))
    return catalog, problems


def load_catalog(paths: Iterable[Path]) -> Catalog:
    """Like :func:`load_catalog_checked`, but raises :class:`ConfigError` on any error, so
    a worker never starts with half a catalog."""
    catalog, problems = load_catalog_checked(paths)
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return catalog


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same quotes and escapes), except that
    # TOML also forbids a raw DEL.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def catalog_to_toml(catalog: Catalog, header: str = "") -> str:
    """The catalog as ``[[message]]`` tables, for operators who want to edit it."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    for key in sorted(catalog):
        entry = catalog[key]
        out += [
            "",
            "[[message]]",
            f"module = {_toml_string(entry.module)}",
            f"event_id = {entry.event_id}",
            f"level = {_toml_string(entry.level)}",
            f"mail = {'true' if entry.mail else 'false'}",
            f"text = {_toml_string(entry.text)}",
        ]
        if entry.description:
            out.append(f"description = {_toml_string(entry.description)}")
        if entry.action:
            out.append(f"action = {_toml_string(entry.action)}")
        if entry.alternates:
            out.append(f"alternates = [{', '.join(map(_toml_string, entry.alternates))}]")
        if entry.log_text:
            out.append(f"log_text = {_toml_string(entry.log_text)}")
        if entry.identity is not None:
            out.append(f"identity = [{', '.join(map(_toml_string, entry.identity))}]")
        if entry.resolves:
            out.append(f"resolves = [{', '.join(map(_toml_string, entry.resolves))}]")
    return "\n".join(out).lstrip("\n") + "\n"
