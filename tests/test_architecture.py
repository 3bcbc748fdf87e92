"""The house: no import circle between the package's modules (type-only imports aside), the top floor stays small,
the README's Layout names every room and module of the top floor and nothing that is not there, and tests/ mirrors
the rooms.

Imports are read with `ast`, as written, at module level and inside functions alike: a lazy import is still an arrow
between two rooms, and a circle of lazy imports is a circle a reader has to untangle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("finetune", "hydra_plugins")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (SRC / package).rglob("*.py")}


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (imports there never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that `name` imports at run time (`from a import b` names module a.b when it is one)."""
    tree = ast.parse(path.read_text())
    skip = type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["finetune.train"], "the walk must see the package and its imports"
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle_and_ignores_type_only_imports(tmp_path, monkeypatch):
    package = tmp_path / "finetune"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from finetune import b\n")
    (package / "b.py").write_text("def f():\n    from finetune.a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from finetune.a import x\n")
    (package / "d.py").write_text("from .c import y\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGES"]), "PACKAGES", ("finetune",))
    graph = import_graph()
    assert graph["finetune.c"] == set() and graph["finetune.d"] == {"finetune.c"}
    assert circles(graph) == [["finetune.a", "finetune.b"]]


@pytest.mark.parametrize("folder", ["finetune"])
def test_the_top_floor_holds_at_most_a_dozen_modules(folder):
    """Entry points and the core of a run; everything else lives in a room by role."""
    assert len(list((SRC / folder).glob("*.py"))) <= 12


ROOT = SRC.parent
PACKAGE = SRC / "finetune"


def layout_paths() -> list[Path]:
    """The paths the README's Layout block names in its first column: at the left margin relative to the repository,
    indented two spaces relative to the folder above (a deeper indent continues the line above's description)."""
    section = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```\n(.*?)```", section, re.S)
    paths, folder = [], ROOT
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent > 2 or not line.strip():
            continue
        names = line.strip().split("  ")[0].split()
        base = ROOT if indent == 0 else folder
        paths += [base / name for name in names]
        if indent == 0:
            folder = ROOT / names[0]
    return paths


def test_every_path_the_readme_layout_names_exists():
    paths = layout_paths()
    assert len(paths) > 20, "the Layout block must be found and read"
    assert [str(p.relative_to(ROOT)) for p in paths if not p.exists()] == []


def test_the_readme_layout_names_every_package_and_top_level_module():
    named = set(layout_paths())
    packages = {p.parent for p in PACKAGE.rglob("__init__.py")} - {PACKAGE}
    top_floor = set(PACKAGE.glob("*.py")) - {PACKAGE / "__init__.py"}
    assert sorted(str(p.relative_to(PACKAGE)) for p in (packages | top_floor) - named) == []


def test_tests_mirror_the_rooms_of_the_package():
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} - {"configs"}  # configs: test_configs.py
    assert sorted(room for room in rooms if not (ROOT / "tests" / room).is_dir()) == []
