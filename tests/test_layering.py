"""The library never depends on the application: nothing in clara/ imports meld."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_clara_never_imports_meld():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m == "meld" or m.startswith("meld."))
        for path in (ROOT / "clara").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 5  # the walk really saw the package
