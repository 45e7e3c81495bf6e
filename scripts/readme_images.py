"""The README's two pictures, made from what `make demo` left in its work dir (profile `toy`).

    python scripts/readme_images.py --workdir workdir/demo [--out docs/images]

- docs/images/toy_storyboard.png: step 04's eight panels (storyboard/panel_*.png, as manifest.json lists them,
  i.e. after best-of-N) with their scene names, in the storyboard's own grid.
- docs/images/toy_sweep.png: step 04's strength sweep (storyboard/sweep/, as sweep.json lists them).

Both are redrawn at a small cell size so the committed pair stays a few hundred KB at most; the same
inputs give the same bytes, so a re-run of `make demo` does not churn git.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "images"
STORYBOARD_PNG = "toy_storyboard.png"
SWEEP_PNG = "toy_sweep.png"
THUMB = 1.6  # inches per cell (160 px): big enough to read a 64² toy panel, small enough to commit


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A step-04 JSON file, or a one-line error naming it and the command that writes it."""
    from kolors_lib.core.errors import MissingInputError

    if not path.is_file():
        raise MissingInputError(f"{path}: no {what}; run `make demo` (or notebook 04 on this work dir) first")
    return json.loads(path.read_text(encoding="utf-8"))


def _existing(files: list[Path], listed_in: Path) -> list[Path]:
    """`files`, or a one-line error naming the first missing one."""
    from kolors_lib.core.errors import MissingInputError

    for f in files:
        if not f.is_file():
            raise MissingInputError(f"{f}: listed in {listed_in} but missing; run notebook 04 on this work dir again")
    return files


def storyboard_picture(workdir: Path, out: Path) -> Path:
    """The chosen panels of step 04 with their scene names, 4 per row, as `out` (PNG)."""
    from kolors_lib.core.config import MANIFEST_FILE
    from kolors_lib.core.images import find_cjk_font
    from kolors_lib.kolors.story import Scene
    from kolors_lib.storyboard.storyboard import grid_figure, panel_captions, save_figure

    board = workdir / "storyboard"
    manifest = _read_json(board / MANIFEST_FILE, "storyboard manifest (step 04)")
    panels = manifest["panels"]
    files = _existing([board / p["file"] for p in panels], board / MANIFEST_FILE)
    font = find_cjk_font(manifest.get("title", "") + "".join(p["scene"] for p in panels))
    captions = panel_captions([Scene(p["scene"], p["prompt"], p["seed"]) for p in panels], font)
    title = manifest.get("title", "") if font is not None else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(grid_figure(files, captions, title=title, cols=min(4, len(files)), font=font, thumb=THUMB),
                       out)


def sweep_picture(workdir: Path, out: Path) -> Path:
    """Step 04's one scene at every swept LoRA strength, in a row, as `out` (PNG)."""
    from kolors_lib.storyboard.storyboard import grid_figure, save_figure

    folder = workdir / "storyboard" / "sweep"
    sweep = _read_json(folder / "sweep.json", "strength sweep (step 04, step 4)")
    files = _existing([folder / name for name in sweep["files"]], folder / "sweep.json")
    captions = [("base (0)" if s == 0 else f"strength {s:g}") for s in sweep["strengths"]]
    title = f"LoRA strength, scene {sweep['scene_index'] + 1:02d} · seed {sweep['seed']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(grid_figure(files, captions, title=title, cols=len(files), thumb=THUMB), out)


def write_readme_images(workdir: Path, out_dir: Path = OUT_DIR) -> list[Path]:
    """Both README pictures from `workdir` into `out_dir`; returns their paths."""
    return [storyboard_picture(workdir, out_dir / STORYBOARD_PNG), sweep_picture(workdir, out_dir / SWEEP_PNG)]


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when both pictures were written, 2 with one error line when an input is missing."""
    from kolors_lib.core.errors import CourseError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "workdir" / "demo", help="the demo's work dir")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the two PNGs go (default: docs/images)")
    args = parser.parse_args(argv)
    try:
        written = write_readme_images(args.workdir, args.out)
    except CourseError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    for path in written:
        print(f"README picture: {path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
