"""The package's import rules: no cycles (imports inside functions count), no private names taken from
another module, every name imported from the module that defines it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kolors_lib"


def module_name(path: Path, root: Path) -> str:
    """`kolors_lib.train.cache` for root/kolors_lib/train/cache.py (a package is its folder's name)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_package(root: Path) -> dict[str, ast.Module]:
    """Every module of the package under `root`, parsed."""
    return {module_name(p, root): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(root.rglob("*.py"))}


def defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments; not its imports)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def imports(tree: ast.Module, package: str) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every import of the package anywhere in the file; name is None for `import m`."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == package:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == package]
    return found


def edges(modules: dict[str, ast.Module]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line}, a `from pkg.sub import mod` counting as an import of pkg.sub.mod."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, tree in modules.items():
        for line, target, imported in imports(tree, name.split(".")[0]):
            full = f"{target}.{imported}" if imported and f"{target}.{imported}" in modules else target
            if full != name and full in modules:
                graph[name].setdefault(full, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def cycle_message(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """The cycle's imports, each as `module:line imports other`."""
    return "; ".join(f"{a}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:], strict=False))


def rule_breaks(modules: dict[str, ast.Module]) -> tuple[list[str], list[str]]:
    """(private names imported from another module, names imported from a module that does not define them)."""
    defined = {name: defined_names(tree) for name, tree in modules.items()}
    private, relayed = [], []
    for name, tree in modules.items():
        for line, target, imported in imports(tree, name.split(".")[0]):
            if imported is None or f"{target}.{imported}" in modules or target not in modules:
                continue
            where = f"{name}:{line} imports {imported} from {target}"
            if imported.startswith("_"):
                private.append(where)
            if imported not in defined[target]:
                relayed.append(where)
    return private, relayed


def exported_elsewhere(modules: dict[str, ast.Module]) -> list[str]:
    """Names a module lists in `__all__` without defining them (a re-export)."""
    found = []
    for name, tree in modules.items():
        if "." not in name:  # the package's own lazy face: `from kolors_lib import train_lora`
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                listed = {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
                found += [f"{name}.__all__ lists {n}" for n in sorted(listed - defined_names(tree))]
    return found


@pytest.fixture(scope="module")
def package() -> dict[str, ast.Module]:
    return read_package(PACKAGE)


def test_the_package_has_no_import_cycle(package) -> None:
    graph = edges(package)
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + cycle_message(graph, cycle)


def test_every_import_of_the_package_names_a_module_that_exists(package) -> None:
    """Imports inside functions run late: one naming a moved module would fail only when that line runs."""
    missing = [f"{name}:{line} imports {target}" for name, tree in package.items()
               for line, target, _ in imports(tree, "kolors_lib") if target not in package]
    assert missing == []


def test_no_module_imports_another_modules_private_name(package) -> None:
    assert rule_breaks(package)[0] == []


def test_every_name_is_imported_from_the_module_that_defines_it(package) -> None:
    assert rule_breaks(package)[1] == []


def test_every_module_exports_only_what_it_defines(package) -> None:
    assert exported_elsewhere(package) == []


def test_a_planted_cycle_is_found_and_named(tmp_path) -> None:
    """The cycle check sees an import placed inside a function, and names the two imports."""
    copy = tmp_path / "kolors_lib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    files = copy / "core" / "files.py"
    files.write_text(files.read_text(encoding="utf-8")
                     + "\n\ndef _planted() -> None:\n    from kolors_lib.core.lock import step_lock  # noqa\n",
                     encoding="utf-8")
    graph = edges(read_package(copy))
    cycle = find_cycle(graph)
    assert set(cycle) == {"kolors_lib.core.files", "kolors_lib.core.lock"}
    assert "kolors_lib.core.files:" in cycle_message(graph, cycle)
    assert "imports kolors_lib.core.lock" in cycle_message(graph, cycle)


def test_a_relayed_and_a_private_import_are_named(tmp_path) -> None:
    """A name taken through a module that only imports it, and an underscore name, are both reported."""
    copy = tmp_path / "kolors_lib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    score = copy / "score" / "scoring.py"
    score.write_text(score.read_text(encoding="utf-8")
                     + "\n\ndef _planted() -> None:\n"
                     + "    from kolors_lib.core.lock import CourseError, _holder  # noqa\n",
                     encoding="utf-8")
    private, relayed = rule_breaks(read_package(copy))
    assert any(p.startswith("kolors_lib.score.scoring:") and "_holder" in p for p in private)
    relayed_line = "CourseError from kolors_lib.core.lock"
    assert any(r.startswith("kolors_lib.score.scoring:") and relayed_line in r for r in relayed)


def test_only_the_profile_hook_and_the_cli_import_the_model_writers(package) -> None:
    """Real code never loads a small model's writer: only `kolors.models` (the tiny profile's first use) and the CLI."""
    allowed = {"kolors_lib.kolors.models", "kolors_lib.cli.main"}
    importers = {name for name, targets in edges(package).items()
                 if any(t.startswith("kolors_lib.offline_models") for t in targets)}
    assert importers - {n for n in package if n.startswith("kolors_lib.offline_models")} <= allowed
