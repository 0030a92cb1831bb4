"""The shape of the code: one-way layering, and a README layout that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
PARTS = ("store", "proxy", "curation", "ui")
# What each part may import from the others: store/ from none, proxy/ and curation/
# from store/ only, the dashboard from store/ and curation/ (the proxy mounts it without
# importing it); never the CLI.
ALLOWED = {
    "store": set(),
    "proxy": {"store"},
    "curation": {"store"},
    "ui": {"store", "curation"},
}
CLI = re.compile(r"^distillery\.cli(_\w+)?$")


def modules(part: str) -> list[Path]:
    return sorted(p for p in (ROOT / part).rglob("*.py") if "migrations" not in p.parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("distillery")}


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_is_below_it(part: Any) -> None:
    wrong = []
    for path in modules(part):
        for name in imports(path):
            other = name.split(".")[1] if name.count(".") else ""
            if CLI.match(name) or (other in PARTS and other != part and other not in ALLOWED[part]):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_the_readme_layout_names_every_module() -> None:
    """The Development section's tree is the real one: every module is named in it."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Development") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    missing = [
        str(path.relative_to(ROOT))
        for part in PARTS
        for path in modules(part)
        if path.name != "__init__.py" and path.name not in layout
    ]
    missing += [
        p.name for p in ROOT.glob("*.py") if p.name not in layout and p.name != "__init__.py"
    ]
    assert missing == []
