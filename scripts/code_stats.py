"""Size and repetition figures for kolors_lib at two git revisions, as a Markdown table (issue 9).

    python scripts/code_stats.py                      # af0e5dc^ (before issue 9) against the working tree
    python scripts/code_stats.py --before REV --after REV
    python scripts/code_stats.py --long 60            # list every function longer than 60 lines

Figures: lines per module, the longest function per module, functions that write a temp file and
os.replace it (atomic writers), exception classes with no kolors_lib exception base (roots), and
divisions of an alpha by a rank (places that compute the LoRA scale).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kolors_lib"
BEFORE = "af0e5dc^"  # the commit before issue 9's consolidation began
BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException)}


@dataclass
class Stats:
    """The figures of one revision."""

    lines: dict[str, int] = field(default_factory=dict)
    longest: dict[str, tuple[str, int]] = field(default_factory=dict)
    atomic_writers: list[str] = field(default_factory=list)
    exception_roots: list[str] = field(default_factory=list)
    alpha_rank: list[str] = field(default_factory=list)
    long_functions: list[tuple[str, int]] = field(default_factory=list)


def sources(rev: str | None) -> dict[str, str]:
    """Module path inside the package (core/errors.py) -> source, at a git revision or in the working tree (None)."""
    if rev is None:
        return {p.relative_to(ROOT / PACKAGE).as_posix(): p.read_text(encoding="utf-8")
                for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", f"{rev}:{PACKAGE}"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{PACKAGE}/{n}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
            for n in sorted(names) if n.endswith(".py")}


def functions(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every function and method with its dotted name (Class.method, outer.inner)."""
    found: list[tuple[str, ast.AST]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((name, child))
                walk(child, name + ".")
            else:
                walk(child, prefix)
    walk(tree, "")
    return found


def _mentions(node: ast.AST, word: str) -> bool:
    """Whether a name, attribute or string key in an expression contains ``word``."""
    for sub in ast.walk(node):
        text = (sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute)
                else sub.value if isinstance(sub, ast.Constant) and isinstance(sub.value, str) else "")
        if word in text.lower():
            return True
    return False


def is_atomic_writer(fn: ast.AST) -> bool:
    """A function that moves a temp path (named tmp/temp/part) onto its target: os.replace/rename or Path's."""
    for sub in ast.walk(fn):
        if not (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                and sub.func.attr in ("replace", "rename")):
            continue
        by_os = isinstance(sub.func.value, ast.Name) and sub.func.value.id == "os"
        moved = sub.args[0] if by_os and sub.args else None if by_os else sub.func.value
        if moved is not None and any(_mentions(moved, w) for w in ("tmp", "temp", "part")):
            return True
    return False


def alpha_over_rank(tree: ast.AST) -> int:
    """How many divisions of something naming alpha by something naming rank."""
    return sum(1 for sub in ast.walk(tree) if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Div)
               and _mentions(sub.left, "alpha") and _mentions(sub.right, "rank"))


def exception_classes(trees: dict[str, ast.AST]) -> dict[str, tuple[str, list[str]]]:
    """Exception classes of the package: name -> (module, base names)."""
    classes = {node.name: (mod, [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases])
               for mod, tree in trees.items() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    exceptions: dict[str, tuple[str, list[str]]] = {}
    changed = True
    while changed:  # a class is an exception if any base is a builtin exception or one of ours
        changed = False
        for name, (mod, bases) in classes.items():
            if name not in exceptions and any(b in BUILTIN_EXCEPTIONS or b in exceptions for b in bases):
                exceptions[name] = (mod, bases)
                changed = True
    return exceptions


def collect(rev: str | None, long_limit: int) -> Stats:
    """The figures of kolors_lib at a revision (None: the working tree)."""
    stats = Stats()
    trees = {}
    for mod, text in sources(rev).items():
        stats.lines[mod] = len(text.splitlines())
        trees[mod] = tree = ast.parse(text)
        spans = [(name, fn.end_lineno - fn.lineno + 1) for name, fn in functions(tree)]
        stats.longest[mod] = max(spans, key=lambda s: s[1], default=("-", 0))
        stats.long_functions += [(f"{mod}:{n}", size) for n, size in spans if size > long_limit]
        stats.atomic_writers += [f"{mod}:{n}" for n, fn in functions(tree) if is_atomic_writer(fn)]
        stats.alpha_rank += [mod] * alpha_over_rank(tree)
    exceptions = exception_classes(trees)
    stats.exception_roots = [f"{mod}:{name}" for name, (mod, bases) in exceptions.items()
                             if not name.startswith("_") and not any(b in exceptions for b in bases)]
    return stats


def table(before: Stats, after: Stats) -> str:
    """The before/after Markdown table."""
    rows = ["| module | lines before | lines after | longest function before | longest function after |",
            "|---|---:|---:|---|---|"]
    for mod in sorted(set(before.lines) | set(after.lines)):
        cells = []
        for s in (before, after):
            cells.append(str(s.lines[mod]) if mod in s.lines else "-")
        for s in (before, after):
            name, size = s.longest.get(mod, ("-", 0))
            cells.append(f"{name} ({size})" if mod in s.longest else "-")
        rows.append(f"| {mod} | " + " | ".join(cells) + " |")
    rows.append(f"| **total** | {sum(before.lines.values())} | {sum(after.lines.values())} | "
                f"{max(before.longest.values(), key=lambda s: s[1])[1]} | "
                f"{max(after.longest.values(), key=lambda s: s[1])[1]} |")
    rows += ["", "| figure | before | after |", "|---|---:|---:|"]
    for label, attr in (("modules over 500 lines", None), ("functions over 60 lines", "long_functions"),
                        ("atomic writers (temp file + os.replace)", "atomic_writers"),
                        ("exception roots", "exception_roots"), ("places computing alpha/rank", "alpha_rank")):
        if attr is None:
            figures = [sum(n > 500 for n in s.lines.values()) for s in (before, after)]
        else:
            figures = [len(getattr(s, attr)) for s in (before, after)]
        rows.append(f"| {label} | {figures[0]} | {figures[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Print the table (and, with --long, the functions over the limit after)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help=f"git revision (default {BEFORE})")
    parser.add_argument("--after", default=None, help="git revision (default: the working tree)")
    parser.add_argument("--long", type=int, default=60, help="function length limit (default 60)")
    parser.add_argument("--details", action="store_true", help="also list the counted places")
    args = parser.parse_args(argv)
    before, after = collect(args.before, args.long), collect(args.after, args.long)
    print(table(before, after))
    if args.details:
        for label, s in (("before", before), ("after", after)):
            print(f"\n{label}: atomic writers {s.atomic_writers}\n{label}: exception roots {s.exception_roots}"
                  f"\n{label}: alpha/rank in {s.alpha_rank}")
            print(f"{label}: functions over {args.long} lines:",
                  ", ".join(f"{n} ({size})" for n, size in sorted(s.long_functions, key=lambda x: -x[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
