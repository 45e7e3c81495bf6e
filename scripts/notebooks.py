"""Course notebooks: check they are committed clean, strip outputs, or run them all with papermill.

    python scripts/notebooks.py check
    python scripts/notebooks.py strip
    python scripts/notebooks.py run --profile tiny --workdir workdir/demo [--only 01 02]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def course_notebooks() -> list[Path]:
    """The step notebooks in order (00_setup is for GPU notebook images, not run here)."""
    return sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))


def problems(path: Path) -> list[str]:
    """What is wrong with how a notebook is committed: outputs, counts, no parameters cell."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count")):
            found.append(f"{path.name}: cell {i} has outputs or an execution count "
                         "(run `python scripts/notebooks.py strip`)")
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if path.name[:2] != "00" and len(tagged) != 1:
        found.append(f"{path.name}: needs exactly one cell tagged 'parameters' (found {len(tagged)})")
    if nb["cells"] and nb["cells"][0]["cell_type"] != "markdown":
        found.append(f"{path.name}: should open with a markdown title")
    return found


def strip(path: Path) -> None:
    """Remove outputs and execution counts in place."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def run(profile: str, workdir: Path, only: list[str] | None) -> list[Path]:
    """Execute the notebooks in order on one work dir; executed copies go to <workdir>/notebooks."""
    import papermill

    out_dir = workdir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for nb in course_notebooks():
        if only and nb.name[:2] not in only:
            continue
        target = out_dir / nb.name
        print(f"running {nb.name} -> {target}", flush=True)
        papermill.execute_notebook(str(nb), str(target), kernel_name="python3", cwd=str(NOTEBOOKS),
                                   parameters={"profile": profile, "workdir": str(workdir.resolve())},
                                   progress_bar=False)
        done.append(target)
    return done


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("strip")
    r = sub.add_parser("run")
    r.add_argument("--profile", default="tiny")
    r.add_argument("--workdir", type=Path, default=ROOT / "workdir" / "demo")
    r.add_argument("--only", nargs="*", help="two-digit notebook numbers to run")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        found = [p for nb in sorted(NOTEBOOKS.glob("*.ipynb")) for p in problems(nb)]
        print("\n".join(found) or f"{len(list(NOTEBOOKS.glob('*.ipynb')))} notebooks are clean")
        return 1 if found else 0
    if args.cmd == "strip":
        for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
            strip(nb)
        return 0
    done = run(args.profile, args.workdir, args.only)
    wd = args.workdir.resolve()
    print(f"\nDone: {len(done)} notebooks ran on the '{args.profile}' profile.")
    print(f"  executed notebooks: {wd / 'notebooks'}")
    outputs = [("imported images", wd / "data" / "raw"),
               ("training set", wd / "data" / "clean" / "train" / "metadata.csv"),
               ("filter report", wd / "data" / "clean" / "report.json"),
               ("trained LoRA", wd / "lora" / "kolors_lora.safetensors"),
               ("loss log", wd / "lora" / "loss.csv"),
               ("storyboard", wd / "storyboard" / "storyboard.png"),
               ("scores", wd / "scores" / "scores.json"),
               ("upload folder", wd / "publish")]
    for name, path in outputs:
        if path.exists():
            print(f"  {name + ':':20}{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
