"""Docstrings and docs name only modules, objects and files that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((REPO / "distill").rglob("*.py")), REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
           REPO / "experiments" / "README.md"]  # fmt: skip
DOTTED = re.compile(r"\bdistill(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATH = re.compile(r"`((?:distill|tests|benchmarks|docs|experiments)/[\w./-]*\.(?:py|md|yaml|sh|sbatch|json))`")


def module_file(dotted: str) -> Path | None:
    if dotted == "distill.experiments" or dotted.startswith("distill.experiments."):  # setup.py maps it
        dotted = dotted.replace("distill.experiments", "experiments", 1)
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, name: str) -> bool:
    """`name` is a top-level function, class or assignment of the module (or a submodule)."""
    if (path.parent / f"{name}.py").is_file() or (path.parent / name / "__init__.py").is_file():
        return path.name == "__init__.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def broken(reference: str) -> str | None:
    """Why a dotted `distill...` reference does not resolve, or None when it does."""
    parts = reference.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        rest = parts[cut:]
        if not rest or defines(path, rest[0]):
            return None
        return f"{'.'.join(parts[:cut])} has no {rest[0]!r}"
    return "no such module"


def test_every_dotted_reference_resolves() -> None:
    problems = []
    for source in SOURCES:
        for ref in sorted(set(DOTTED.findall(source.read_text()))):
            why = broken(ref.rstrip("."))
            if why:
                problems.append(f"{source.relative_to(REPO)}: {ref}: {why}")
    assert not problems, "\n".join(problems)


def test_every_cited_file_exists() -> None:
    problems = [
        f"{source.relative_to(REPO)}: {path}"
        for source in SOURCES
        for path in sorted(set(PATH.findall(source.read_text())))
        if not (REPO / path).exists()
    ]
    assert not problems, "\n".join(problems)
