"""Course notebooks: check they are committed clean, strip outputs, or run them all with papermill.

    python scripts/notebooks.py check
    python scripts/notebooks.py strip
    python scripts/notebooks.py run --profile toy --workdir workdir/demo [--only 01 02]   # make demo (tiny: seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# on a quiet 2-core machine (README, "Getting started"): keep in step with it
RUN_TIMES = {"tiny": "About 2 minutes on tiny. ",
             "toy": "About 2 minutes on toy once the toy Kolors is trained (`make demo` trains it first; "
                    "otherwise notebook 02 does, once per machine). "}


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


def _clock(seconds: float) -> str:
    """m:ss"""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _first_line(source: str) -> str:
    """The first line of code of a cell (comments and magics skipped), shortened."""
    lines = [ln.strip() for ln in source.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "%"))]
    line = lines[0] if lines else ""
    return line if len(line) <= 70 else line[:67] + "..."


def progress_engine(label: str, started: float, out=None, every: float = 30.0):
    """A papermill engine printing one line per code cell: `[label cell i/n] m:ss  first line of the cell`,
    and `... still running` every `every` seconds while a cell runs."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager

    def say(text: str) -> None:
        print(text, file=out or sys.stdout, flush=True)

    class Manager(NotebookExecutionManager):
        ticker: threading.Event | None = None

        def cell_start(self, cell, cell_index=None, **kwargs):
            super().cell_start(cell, cell_index, **kwargs)
            if cell.cell_type != "code":
                return
            code = [c for c in self.nb.cells if c.cell_type == "code"]
            where = f"[{label} cell {next(i for i, c in enumerate(code, start=1) if c is cell)}/{len(code)}]"
            say(f"  {where} {_clock(time.monotonic() - started)}  {_first_line(cell.source)}")
            self.ticker = stop = threading.Event()

            def tick() -> None:
                while not stop.wait(every):
                    say(f"  {where} {_clock(time.monotonic() - started)}  ... still running")

            threading.Thread(target=tick, daemon=True).start()

        def cell_complete(self, cell, cell_index=None, **kwargs):
            if self.ticker is not None:
                self.ticker.set()
            super().cell_complete(cell, cell_index, **kwargs)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(cls, nb, kernel_name, output_path=None, progress_bar=False, log_output=False,
                             autosave_cell_every=30, **kwargs):
            nb_man = Manager(nb, output_path=output_path, progress_bar=False, log_output=log_output,
                             autosave_cell_every=autosave_cell_every)
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.notebook_complete()
            return nb_man.nb

    return Engine


def run(profile: str, workdir: Path, only: list[str] | None) -> list[Path]:
    """Execute the notebooks in order on one work dir; executed copies go to <workdir>/notebooks.

    Prints which notebook runs, each code cell as it starts and the time elapsed.
    """
    import papermill
    from papermill.engines import papermill_engines

    out_dir = workdir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [nb for nb in course_notebooks() if not only or nb.name[:2] in only]
    started = time.monotonic()
    done = []
    for number, nb in enumerate(chosen, start=1):
        target = out_dir / nb.name
        print(f"[{number}/{len(chosen)}] {nb.name} -> {target}", flush=True)
        begin = time.monotonic()
        papermill_engines.register("course-progress", progress_engine(nb.stem, started))
        papermill.execute_notebook(str(nb), str(target), kernel_name="python3", cwd=str(NOTEBOOKS),
                                   parameters={"profile": profile, "workdir": str(workdir.resolve())},
                                   engine_name="course-progress", progress_bar=False,
                                   # the kernel's "running over TCP" notice is for servers, not a local run
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
        now = time.monotonic()
        print(f"  {nb.name} done in {_clock(now - begin)} ({_clock(now - started)} so far)", flush=True)
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
    print(f"Running the course notebooks on the '{args.profile}' profile (offline). {RUN_TIMES.get(args.profile, '')}"
          f"The first two notebooks are quick, 03 (training) and 04 (rendering) take longest.", flush=True)
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
               ("upload folder", wd / "publish"),
               ("libraries' logs", wd / "logs")]
    for name, path in outputs:
        if path.exists():
            print(f"  {name + ':':20}{path}")
    jupyter = Path(sys.executable).parent / "jupyter"
    with contextlib.suppress(ValueError):
        jupyter = jupyter.relative_to(Path.cwd())
    print(f"Open them in JupyterLab: {jupyter} lab {wd / 'notebooks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
