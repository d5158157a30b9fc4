"""The layering the docs describe, checked from the source: ``shared`` stands alone, no
two of our modules import each other (even lazily, inside a function), and the
operator's DLQ commands do not load the SMTP side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "producer", "worker")


def imported(path: Path) -> set[str]:
    """The modules a file imports anywhere in its body (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> our modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            deps = {n for n in imported(path) if n.split(".")[0] in PACKAGES}
            graph[module] = deps - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])
    return found


def test_the_graph_sees_lazy_imports_and_finds_cycles() -> None:
    graph = import_graph()
    assert "shared.vendor_csv" in graph["shared.catalog"]
    assert "worker.dlq_cli" in graph["worker.cli"]  # imported inside a function there
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_shared_imports_nothing_from_producer_or_worker() -> None:
    outside = {
        module: sorted(d for d in deps if not d.startswith("shared"))
        for module, deps in import_graph().items()
        if module.startswith("shared")
    }
    assert {m: d for m, d in outside.items() if d} == {}


def test_the_dlq_commands_do_not_load_the_smtp_side() -> None:
    probe = (
        "import sys, worker.dlq_cli, worker.dlq; "
        "print(sorted(m for m in ('aiosmtplib', 'tenacity') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_one_placeholder_grammar_on_the_standard_library_alone() -> None:
    # The renderer, the vendor CSV reader and the match-back read catalog texts alike;
    # the node agent loads the grammar, so it may pull in nothing else.
    graph = import_graph()
    for user in ("worker.render", "shared.vendor_csv", "producer.matchback"):
        assert "shared.placeholders" in graph[user], user
    top_level = {name.split(".")[0] for name in imported(ROOT / "shared" / "placeholders.py")}
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}, top_level
