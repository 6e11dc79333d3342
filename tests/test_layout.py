"""The package's stages import downwards only (docs/architecture.md).

Every ``import`` in the package, at the top of a module or inside a function, is read from the
source with :mod:`ast` and checked against the stage map below. A stage may import itself, the
stages it is allowed to, and the foundation modules at the package's top; nothing may import the
command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchkling"

#: Modules at the package's top that every stage may use; they import only each other.
FOUNDATION = frozenset({"errors", "models", "clock", "logs", "catalog", "pricing"})

#: What each stage may import besides itself and the foundation.
ALLOWED: dict[str, frozenset[str]] = {
    "foundation": frozenset(),
    "manifest": frozenset(),
    "store": frozenset(),
    "providers": frozenset(),
    "simulator": frozenset(),
    "outputs": frozenset({"store"}),
    "run": frozenset({"store", "providers", "outputs", "manifest"}),
    # The top: the command line, its live display, the library's face and the test helpers.
    "top": frozenset({"manifest", "store", "providers", "outputs", "run", "simulator"}),
}
TOP = frozenset({"cli", "progress", "testing", "__init__", "__main__"})


def stage_of(module: str) -> str:
    """The stage of a dotted module name inside the package (``batchkling.run.engine`` → run)."""
    parts = module.split(".")
    assert parts[0] == "batchkling", module
    if len(parts) == 1:
        return "top"
    head = parts[1]
    if head in FOUNDATION:
        return "foundation"
    if head in TOP:
        return "top"
    if head in ALLOWED:
        return head
    raise AssertionError(f"{module}: no stage for {head!r}; add it to tests/test_layout.py")


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every batchkling module imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("batchkling")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("batchkling"):
                continue
            # `from batchkling.run import crashpoints` imports batchkling.run.crashpoints.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                sub = PACKAGE.parent / Path(*candidate.split("."))
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                found.append((node.lineno, candidate if is_module else base))
    return found


def allowed(module: str, here: str, target: str, there: str) -> bool:
    """Whether ``module`` (in stage ``here``) may import ``target`` (in stage ``there``)."""
    if target == "batchkling.cli":
        return module == "batchkling.__main__"
    if there == "top":
        return here == "top"
    return there in (here, "foundation") or there in ALLOWED[here]


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import that runs back up the stages, as ``file:line: a -> b``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        here = stage_of(module)
        for line, target in imported_modules(path, module):
            there = stage_of(target)
            if not allowed(module, here, target, there):
                where = path.relative_to(root.parent)
                found.append(f"{where}:{line}: {here} -> {there} ({target})")
    return found


def test_imports_flow_down_the_stages() -> None:
    """No module imports a stage above its own, and nothing but ``__main__`` imports the CLI."""
    assert violations() == []


def test_every_stage_says_what_it_owns() -> None:
    """Each stage's ``__init__.py`` has a docstring naming what it may import."""
    for stage in ("manifest", "store", "run", "providers", "outputs", "simulator"):
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc, f"batchkling/{stage}/__init__.py has no docstring"
        if stage != "simulator":
            assert "May import" in doc, f"batchkling/{stage}/__init__.py: say what it may import"


@pytest.mark.parametrize(
    ("stage", "source", "target"),
    [
        ("store", "from batchkling.run.engine import Engine\n", "run"),
        ("providers", "import batchkling.outputs.report\n", "outputs"),
        ("manifest", "def f():\n    from batchkling.store import Store\n", "store"),
        ("outputs", "from batchkling import cli\n", "top"),
        ("run", "from batchkling.cli import main\n", "top"),
    ],
)
def test_an_import_back_up_is_caught(tmp_path: Path, stage: str, source: str,
                                     target: str) -> None:
    """A planted upward import (the store importing the engine, say) is reported."""
    copy = tmp_path / "batchkling"
    for path in PACKAGE.rglob("*.py"):
        dest = copy / path.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (copy / stage / "planted.py").write_text(source, encoding="utf-8")
    found = violations(copy)
    assert len(found) == 1, found
    assert f"{stage} -> {target}" in found[0]
