"""scripts/readme_images.py: the README's storyboard and sweep pictures from a demo work dir (hand-made panels)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import readme_images  # noqa: E402

COLOURS = [(220, 30, 30), (30, 60, 220), (30, 170, 60), (235, 205, 20),
           (200, 40, 200), (20, 200, 210), (240, 130, 20), (110, 40, 160)]
GREYS = [(220, 30, 30), (190, 70, 70), (160, 100, 100), (130, 120, 120), (110, 110, 110)]


def _disc(path: Path, colour: tuple[int, int, int]) -> None:
    """A 64² toy-like panel: a flat disc of `colour` on white."""
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _demo_workdir(root: Path) -> Path:
    """What notebook 04 leaves in a work dir: 8 panels + manifest.json, a 5-strength sweep + sweep.json."""
    board = root / "storyboard"
    panels = []
    for i, colour in enumerate(COLOURS):
        _disc(board / f"panel_{i + 1:02d}.png", colour)
        panels.append({"index": i, "file": f"panel_{i + 1:02d}.png", "scene": f"场景{i + 1}",
                       "prompt": "古风，水墨画，一个红色的圆形，白色的背景", "seed": 10 + i})
    (board / "manifest.json").write_text(json.dumps({"title": "红色圆形的一天", "panels": panels},
                                                    ensure_ascii=False), encoding="utf-8")
    strengths = [0, 0.25, 0.5, 0.75, 1.0]
    files = [f"scene01_s{s:.2f}.png" for s in strengths]
    for name, colour in zip(files, GREYS, strict=True):
        _disc(board / "sweep" / name, colour)
    (board / "sweep" / "sweep.json").write_text(json.dumps({"scene_index": 0, "seed": 1, "strengths": strengths,
                                                            "files": files}), encoding="utf-8")
    return root


def _where(picture: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float] | None:
    """Centre (x, y as fractions of the picture) of the pixels within 6 of `colour`, None if under 200."""
    ys, xs = np.nonzero(np.abs(picture.astype(int) - colour).max(axis=2) <= 6)
    if len(xs) < 200:
        return None
    return xs.mean() / picture.shape[1], ys.mean() / picture.shape[0]


def test_both_pictures_show_the_panels_in_order_and_stay_small(tmp_path: Path) -> None:
    work, out = _demo_workdir(tmp_path / "demo"), tmp_path / "docs" / "images"
    board, sweep = readme_images.write_readme_images(work, out)
    assert (board, sweep) == (out / "toy_storyboard.png", out / "toy_sweep.png")
    assert board.stat().st_size + sweep.stat().st_size < 300 * 1024
    grid = np.asarray(Image.open(board).convert("RGB"))
    centres = [_where(grid, c) for c in COLOURS]
    assert None not in centres, centres  # every panel is in the grid
    assert all(x < 0.5 for x, _ in centres[0:2]) and all(x > 0.5 for x, _ in centres[2:4])  # 4 per row, in order
    assert all(y < 0.5 for _, y in centres[:4]) and all(y > 0.5 for _, y in centres[4:])   # two rows
    row = np.asarray(Image.open(sweep).convert("RGB"))
    xs = [_where(row, c)[0] for c in GREYS]
    assert xs == sorted(xs) and row.shape[1] > 3 * row.shape[0]  # strength 0 -> 1, left to right, one row


def test_a_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    work = _demo_workdir(tmp_path / "demo")
    first = [p.read_bytes() for p in readme_images.write_readme_images(work, tmp_path / "a")]
    second = [p.read_bytes() for p in readme_images.write_readme_images(work, tmp_path / "a")]
    assert first == second  # committed pictures do not churn when make demo runs again


@pytest.mark.parametrize("missing", ["storyboard/manifest.json", "storyboard/panel_03.png",
                                     "storyboard/sweep/sweep.json"])
def test_a_missing_demo_output_is_one_error_line(tmp_path: Path, missing: str, capsys) -> None:
    work = _demo_workdir(tmp_path / "demo")
    (work / missing).unlink()
    assert readme_images.main(["--workdir", str(work), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and missing.split("/")[-1] in err[0], err
    assert "notebook 04" in err[0]


def test_the_readme_shows_the_files_the_script_writes() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme_images.OUT_DIR == ROOT / "docs" / "images"
    for name in (readme_images.STORYBOARD_PNG, readme_images.SWEEP_PNG):
        assert f"](docs/images/{name})" in readme, name
    make = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "--profile toy" in make and "scripts/readme_images.py --workdir workdir/demo --out docs/images" in make
