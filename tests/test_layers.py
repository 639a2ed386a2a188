"""The package's folders are its layers: imports go one way, at module top, with no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "distill"
LAYERS = {
    "base": 0, "config": 1, "models": 2, "losses": 3, "data": 3, "core": 4,
    "eval": 5, "negatives": 5, "training": 6, "deploy": 7, "commands": 8,
}  # fmt: skip
"""Folder -> layer; the modules at the top of `distill/` are the base layer. A module may
import from its own layer or those below; same-layer imports must not form a cycle."""
ENTRY_POINTS = {"distill.__main__"}
"""Run, never imported: `python -m distill` calls the CLI from the base folder."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "base"


def resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        return [".".join([*base, node.module] if node.module else base)]
    return [node.module or ""]


def parse_modules() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))}


MODULES = parse_modules()


def top_imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of the module-level imports of `module`."""
    path, tree = MODULES[module]
    out = []
    for node in tree.body:
        stmts = [node]
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks count as imports too
            stmts = node.body
        for stmt in stmts:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                names = [a.name for a in stmt.names] if isinstance(stmt, ast.ImportFrom) else []
                for target in resolve(stmt, module, path.name == "__init__.py"):
                    out.append((stmt.lineno, target, names))
    return out


def owner(target: str) -> str | None:
    """The distill module an import statement reads from (`distill.x.y` or its package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_every_import_goes_down_the_layers() -> None:
    problems = []
    for module in MODULES:
        if module in ENTRY_POINTS:
            continue
        for line, target, _ in top_imports(module):
            dep = owner(target) if target.startswith("distill") else None
            if dep is None or dep == module:
                continue
            if LAYERS.get(layer(dep), 0) > LAYERS.get(layer(module), 0):
                problems.append(f"{module}:{line} imports {dep} ({layer(dep)} is above {layer(module)})")
    assert not problems, "\n".join(problems)


def test_no_import_cycle() -> None:
    graph = {m: {owner(t) for _, t, _ in top_imports(m) if t.startswith("distill")} - {None, m} for m in MODULES}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node):], node]))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*path, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_no_private_name_crosses_modules() -> None:
    found = [
        f"{module}:{line} imports {name} from {target}"
        for module in MODULES
        for line, target, names in top_imports(module)
        if target.startswith("distill")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not found, "\n".join(found)


def commented(lines: list[str], i: int) -> bool:
    """A comment on line i, on an import line of the block it ends, or just above the block."""
    while i >= 0:
        if "#" in lines[i]:
            return True
        if not lines[i].strip().startswith(("import ", "from ")):
            return False
        i -= 1
    return False


def test_function_local_imports_are_commented_optional_dependencies() -> None:
    """A function-local import is only for an optional or heavy third-party package, and a
    comment on its line or the line above says why."""
    problems = []
    for module, (path, tree) in MODULES.items():
        lines = path.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                targets = resolve(node, module, path.name == "__init__.py")
                where = f"{module}:{node.lineno}"
                if any(t.startswith("distill") for t in targets):
                    problems.append(f"{where} imports {', '.join(targets)} inside a function")
                elif not commented(lines, node.lineno - 1):
                    problems.append(f"{where} imports {', '.join(targets)} inside a function without a comment")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", ["distill.deploy.search", "distill.deploy.serve", "distill.deploy.export",
                                    "distill.training.checkpoint", "distill.commands.search"])
def test_deploy_modules_do_not_import_lightning(module: str) -> None:
    code = f"import sys, {module}; print('pytorch_lightning' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"{module} pulls in Lightning"


def test_cli_help_imports_no_command() -> None:
    code = ("import sys, contextlib, io\nfrom distill.commands.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    try: main(['--help'])\n    except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('distill.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['distill.commands.cli']"
