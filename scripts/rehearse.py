"""Full-size rehearsal on CPU: notebooks 01->06 on profile `full`, pointed at a real-size random Kolors.

    python scripts/rehearse.py [--models DIR] [--workdir DIR] [--resolution 256] [--steps 2]

Writes the real-size random Kolors once (`python -m kolors_lib tiny-kolors DIR --size full`),
then runs every course notebook with papermill on profile `full` and a config that changes only
values (models.*.local_dir, resolution, train.steps, train.precision bf16-mixed, generate size
and steps): the same functions, files and loading code a GPU learner runs, at real model size.
Peak resident memory per notebook (the kernel and its children, sampled every 0.2 s) and
seconds go to <workdir>/rehearsal.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from notebooks import NOTEBOOKS, course_notebooks  # noqa: E402

GIB = 2**30


def rehearsal_config(models: Path, resolution: int, steps: int, gen_steps: int) -> dict:
    """The rehearsal's course config: profile `full` with value overrides only."""
    return {"profiles": {"full": {
        "resolution": resolution,
        "models": {"kolors": {"local_dir": str(models / "Kolors")},
                   "vae_fp16_fix": {"local_dir": str(models / "sdxl-vae-fp16-fix")},
                   "aesthetic": {"local_dir": str(models / "aesthetics-predictor")}},
        "data": {"source": "sample"},
        # random weights: the real-size aesthetic predictor scores ~0 (a 0-10 threshold would drop every
        # image), and no real-size Qwen2-VL is written (captioning is exercised on tiny): keep captions
        "filter": {"aesthetic_min_score": -10.0, "caption_mode": "keep"},
        # bf16 weights on the CPU (fp16-mixed keeps fp32 weights there: 23 GiB for ChatGLM)
        "train": {"steps": steps, "precision": "bf16-mixed", "save_every": steps, "validate_every": 0},
        "generate": {"steps": gen_steps, "width": resolution, "height": resolution},
    }}}


def _descendants(pid: int) -> list[int]:
    """Pids of every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def status_kib(pid: int, field: str) -> int:
    """One kB field of /proc/PID/status (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """Samples the summed RSS of this process's descendants (and their own high-water marks)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_kib, self.peak_at, self._stop = interval, 0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(os.getpid())
            total = sum(status_kib(p, "VmRSS") for p in pids)
            hwm = max((status_kib(p, "VmHWM") for p in pids), default=0)
            if max(total, hwm) > self.peak_kib:
                self.peak_kib, self.peak_at = max(total, hwm), time.time()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_cell(notebook: Path, at: float) -> str:
    """The code cell that was running at time `at` (papermill's per-cell start/end times)."""
    import datetime as dt

    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        meta = cell.get("metadata", {}).get("papermill", {})
        if not meta.get("start_time") or not meta.get("end_time"):
            continue
        start, end = (dt.datetime.fromisoformat(meta[k].rstrip("Z")).replace(tzinfo=dt.timezone.utc).timestamp()
                      for k in ("start_time", "end_time"))
        if start <= at <= end + 1:
            first = next((line for line in "".join(cell["source"]).splitlines()
                          if line.strip() and not line.startswith(("from ", "import ", "%"))), "")
            return f"cell {i}: {first.strip()[:60]}"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Write the models if needed, run notebooks 01->06 on them, print and save the memory table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "workdir" / "full-kolors")
    p.add_argument("--workdir", type=Path, default=ROOT / "workdir" / "rehearse")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="training steps")
    p.add_argument("--gen-steps", type=int, default=2, help="denoising steps per panel")
    p.add_argument("--only", nargs="*", help="two-digit notebook numbers to run")
    args = p.parse_args(argv)
    import papermill
    import yaml

    from kolors_lib.offline_models.fullsize import write_full_kolors

    start = time.monotonic()
    write_full_kolors(args.models)
    written = time.monotonic() - start
    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    config = wd / "rehearse.yaml"
    config.write_text(yaml.safe_dump(rehearsal_config(args.models.resolve(), args.resolution, args.steps,
                                                      args.gen_steps), allow_unicode=True), encoding="utf-8")
    (wd / "notebooks").mkdir(exist_ok=True)
    rows = []
    for nb in course_notebooks():
        if args.only and nb.name[:2] not in args.only:
            continue
        print(f"running {nb.name}", flush=True)
        began = time.monotonic()
        with PeakRss() as peak:
            papermill.execute_notebook(str(nb), str(wd / "notebooks" / nb.name), kernel_name="python3",
                                       cwd=str(NOTEBOOKS), progress_bar=False,
                                       parameters={"profile": "full", "workdir": str(wd), "config": str(config)})
        rows.append({"phase": nb.stem, "peak_rss_gib": round(peak.peak_kib / 2**20, 2),
                     "seconds": round(time.monotonic() - began, 1),
                     "peak_cell": peak_cell(wd / "notebooks" / nb.name, peak.peak_at)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"resolution": args.resolution, "steps": args.steps, "gen_steps": args.gen_steps,
              "models": str(args.models), "seconds_writing_models": round(written, 1),
              "seconds_notebooks": round(sum(r["seconds"] for r in rows), 1), "phases": rows}
    (wd / "rehearsal.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("\n| phase | peak RSS (GiB) | seconds | peak while |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} | {r['peak_cell']} |")
    print(f"| total (after the weights were written) | {max(r['peak_rss_gib'] for r in rows):.2f} | "
          f"{result['seconds_notebooks']:.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
