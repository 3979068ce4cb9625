"""The layering of DESIGN.md section 1, checked on the source: the model package ``atmoe/`` imports
neither the catalog (``atmoe.registry``), the command line (``atmoe.cli``), the server (``atmoe.serve``)
nor the demo application (``atmoe.demo``); the catalog imports no command line and no server; the
server imports no command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("atmoe", ("atmoe.registry", "atmoe.cli", "atmoe.demo", "atmoe.serve")),
        ("registry", ("atmoe.cli", "atmoe.demo", "atmoe.serve")),
        ("serve", ("atmoe.cli", "atmoe.demo")),
    ],
)
def test_the_lower_layers_do_not_import_the_upper_ones(folder, forbidden):
    offending = {
        path: sorted(n for n in names if n.startswith(forbidden))
        for path, names in _imports(folder).items()
        if any(n.startswith(forbidden) for n in names)
    }
    assert offending == {}
