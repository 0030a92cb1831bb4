"""The shape of the code: one-way layering, and a README layout that names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
PARTS = ("core", "store", "proxy", "curation", "ui", "commands")
# What each part may import from the others: core/ (settings, errors, shapes: the
# vocabulary) from none, store/ from core/ only, proxy/ and curation/ from store/, the
# dashboard from store/ and curation/ (the proxy mounts it without importing it), the
# commands from any; only cli.py imports the commands.
ALLOWED = {
    "core": set(),
    "store": {"core"},
    "proxy": {"core", "store"},
    "curation": {"core", "store"},
    "ui": {"core", "store", "curation"},
    "commands": {"core", "store", "proxy", "curation", "ui"},
}
CLI = re.compile(r"^distillery\.cli$")
# The root holds the entry points only; everything else lives in a part.
ROOT_MODULES = {"__init__.py", "__main__.py", "cli.py"}


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


def test_the_root_holds_only_the_entry_points() -> None:
    """cli.py (the click group and main), __main__.py and the package's __init__.py:
    commands live in commands/, foundations and vocabulary in core/."""
    assert {p.name for p in ROOT.glob("*.py")} == ROOT_MODULES


def test_cli_py_stays_thin() -> None:
    """The click group and its commands wired together: tens of lines, no logic."""
    assert len((ROOT / "cli.py").read_text().splitlines()) <= 60


@pytest.mark.slow
def test_the_wheel_holds_every_part_and_its_command_runs(tmp_path: Path) -> None:
    """Built as pip builds it for PyPI, unpacked, and run from there (not from this
    checkout): `distillery --help` and `python -m distillery --help` work, every subpackage
    and the dashboard's templates are in it, and no root module but the entry points."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # From a copy: setuptools leaves build/ behind in the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "__pycache__", "*.egg-info"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("distillery-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    for part in PARTS:
        assert f"distillery/{part}/__init__.py" in names, part
    assert "distillery/ui/templates/routes.html" in names
    root = {n.split("/")[1] for n in names if n.startswith("distillery/") and n.count("/") == 1}
    assert root == ROOT_MODULES
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    for command in (["-c", "from distillery.cli import main; main()"], ["-m", "distillery"]):
        ran = subprocess.run(
            [sys.executable, *command, "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert ran.returncode == 0 and "routes" in ran.stdout, ran.stderr
    where = subprocess.run(
        [sys.executable, "-c", "import distillery.commands.proxy as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr


def test_the_commands_import_at_the_top() -> None:
    """A command module imports what it needs at its top (the lazy group keeps --help
    light); only the training extra, which may not be installed, is imported where used."""
    extra = re.compile(r"^(torch|transformers|trl|peft|datasets|vllm)(\.|$)")
    inside = []
    for path in modules("commands"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        names = (
                            [a.name for a in inner.names]
                            if isinstance(inner, ast.Import)
                            else [inner.module or ""]
                        )
                        if not all(extra.match(n) for n in names):
                            inside.append(f"{path.name}:{inner.lineno} imports {', '.join(names)}")
    assert inside == []


def test_no_command_function_is_longer_than_80_lines() -> None:
    """Commands parse, call and render; the work is the parts' (a long function here is
    work that belongs in curation/ or store/)."""
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in modules("commands")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_the_dashboards_pages_never_import_the_app_that_wires_them() -> None:
    """ui/app.py imports the pages; a page imports ui/base.py, never ui/app.py (the cycle
    that imports inside functions used to close)."""
    wrong = [
        path.name
        for path in modules("ui")
        if path.name != "app.py" and "distillery.ui.app" in imports(path)
    ]
    assert wrong == []


def test_tests_share_through_helper_modules_never_through_another_test() -> None:
    """A test module imports fixtures and helpers from helper modules (helpers.py, fakes, a
    folder's conftest.py or *_data.py), never from another test module: moving or splitting
    one never breaks another."""
    tests = ROOT / "tests"
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            wrong += [
                f"{path.relative_to(ROOT)} imports {n}" for n in names if n.startswith("test_")
            ]
    assert wrong == []
