"""``clusteralert-worker catalog list|show|import``: what the worker would do with each
event kind under the current config, and why; and the vendor CSV converted to TOML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.catalog import Catalog, CatalogEntry, catalog_to_toml, load_catalog
from shared.config import FilterConfig, load_config
from shared.errors import ClusteralertError, Problem
from shared.event import new_event
from shared.filter import Decision, decide

__all__ = ["add_catalog_parser", "run_catalog"]


def add_catalog_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    catalog = sub.add_parser("catalog", help="inspect the catalog, or import a vendor CSV")
    actions = catalog.add_subparsers(dest="catalog_command", required=True)
    listing = actions.add_parser("list", help="every event kind and whether it is mailed")
    listing.add_argument("--config", help="config file")
    listing.add_argument("--mail-only", action="store_true", help="only kinds that are mailed")
    listing.add_argument("--module", help="only this module")
    show = actions.add_parser("show", help="one event kind in full, and the decision")
    show.add_argument("key", metavar="MODULE:ID")
    show.add_argument("--config", help="config file")
    show.add_argument(
        "--level",
        choices=("info", "warning", "error"),
        help="the level an event would carry (for kinds not in the catalog)",
    )
    imported = actions.add_parser("import", help="print a vendor CSV as catalog TOML")
    imported.add_argument("file", type=Path)


def _loaded(config_path: str | None) -> tuple[Catalog, FilterConfig]:
    config = load_config(config_path, sections=("catalog", "filter"))
    return load_catalog(config.catalog.paths), config.filter


def _decision(
    module: str, event_id: int, catalog: Catalog, filters: FilterConfig, level: str | None = None
) -> Decision:
    event = new_event(
        module=module, event_id=event_id, cluster="-", node="-", source="catalog", level=level
    )
    return decide(event, catalog, filters)


def _list(args: argparse.Namespace) -> int:
    catalog, filters = _loaded(args.config)
    shown = 0
    for module, event_id in sorted(catalog):
        if args.module and module != args.module:
            continue
        entry = catalog[(module, event_id)]
        decision = _decision(module, event_id, catalog, filters)
        if args.mail_only and not decision.mail:
            continue
        verdict = "MAIL" if decision.mail else "skip"
        print(f"{entry.key:<20} {entry.level:<8} {verdict:<5} {entry.text[:60]}")
        shown += 1
    print(f"{shown} event kind(s)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    module, _, raw_id = args.key.partition(":")
    if not (raw_id.isascii() and raw_id.isdigit()):
        raise ClusteralertError(f"{args.key!r}: expected MODULE:ID, e.g. rm:9")
    module = module.lower()
    catalog, filters = _loaded(args.config)
    entry: CatalogEntry | None = catalog.lookup(module, int(raw_id))
    decision = _decision(module, int(raw_id), catalog, filters, args.level)
    print(f"event:       {module}:{raw_id}")
    if entry is None:
        print("catalog:     not in the catalog")
    else:
        print(f"level:       {entry.level}")
        print(f"mail flag:   {'on' if entry.mail else 'off'}")
        print(f"text:        {entry.text}")
        for alternate in entry.alternates:
            print(f"alternate:   {alternate}")
        if entry.log_text:
            print(f"log text:    {entry.log_text}")
        if entry.description:
            print(f"description: {entry.description}")
        if entry.action:
            print(f"action:      {entry.action}")
        identity = "all params" if entry.identity is None else ", ".join(entry.identity)
        print(f"identity:    {identity or 'none (one incident per cluster)'}")
        if entry.resolves:
            print(f"resolves:    {', '.join(entry.resolves)}")
    print(f"decision:    {'mailed' if decision.mail else 'not mailed'} ({decision.why})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from shared.catalog import decode_csv
    from shared.vendor_csv import parse_vendor_csv

    problems: list[Problem] = []
    try:
        text = decode_csv(args.file.read_bytes(), str(args.file), problems)
    except OSError as exc:
        raise ClusteralertError(f"cannot read {args.file}: {exc.strerror}") from None
    catalog = parse_vendor_csv(text, str(args.file), problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.stdout.write(
        catalog_to_toml(
            catalog,
            f"clusteralert catalog imported from {args.file.name}\n"
            f"{len(catalog)} event kinds; edit freely, then name this file in "
            "[catalog] path.",
        )
    )
    return 1 if any(p.severity == "error" for p in problems) else 0


def run_catalog(args: argparse.Namespace) -> int:
    commands = {"list": _list, "show": _show, "import": _import}
    return commands[args.catalog_command](args)
