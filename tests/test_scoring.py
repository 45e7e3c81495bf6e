"""Step 05: aesthetic scores as the challenge computed them, the gate, style consistency, reports, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_lib.cli.main import main as cli_main
from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import ScoreError
from kolors_lib.kolors.models import resolve_model
from kolors_lib.score.scoring import ScoreResult, is_panel, score_folder

patch_torchvision()


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random predictor, written once for the module through the tiny profile."""
    cfg = load_config(profile="tiny", workdir=tmp_path_factory.mktemp("models") / "workdir")
    return resolve_model(cfg, "aesthetic")


@pytest.fixture
def cfg(tmp_path: Path, aesthetic_dir: Path) -> Config:
    """A tiny-profile config in a fresh work dir that reuses the module's predictor."""
    return load_config(profile="tiny", workdir=tmp_path / "workdir",
                       overrides={"models": {"aesthetic": {"local_dir": str(aesthetic_dir)}}})


def _panel(i: int, size: int = 64) -> Image.Image:
    """Smooth gradients of one palette: the 'consistent style' panels."""
    x = np.linspace(0, 1, size)[None, :, None]
    y = np.linspace(0, 1, size)[:, None, None]
    rgb = np.concatenate([x * 200 + 20 + 3 * i + 0 * y, y * 150 + 50 + 0 * x, 180 + 0 * x + 0 * y], axis=2)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _checker(size: int = 64) -> Image.Image:
    """A red/green checkerboard: nothing like the gradients (checked to be the outlier for the tiny model)."""
    a = np.indices((size, size)).sum(0) // 8 % 2
    return Image.fromarray(np.stack([a * 255, (1 - a) * 255, a * 0], 2).astype(np.uint8))


def _storyboard(folder: Path, n: int = 4, outlier: int | None = None, grid: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _checker() if i == outlier else _panel(i, size=64 + 8 * i)
        img.save(folder / f"panel_{i + 1:02d}.png")
    if grid:
        _checker(128).save(folder / "storyboard.png")
    panels = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
              for p in sorted(folder.glob("panel_*.png"))]
    (folder / "manifest.json").write_text(json.dumps({"panels": panels}))  # step 04's, as score checks it
    return folder


def _direct_scores(model_dir: Path, paths: list[Path]) -> dict[str, tuple[float, torch.Tensor]]:
    """The challenge's recipe, one image at a time, written independently of kolors_lib.score.scoring."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor

    model = AestheticsPredictorV2Linear.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    out = {}
    for path in paths:
        with torch.no_grad():
            res = model(**processor(images=Image.open(path), return_tensors="pt"))
        out[path.name] = (res.logits.tolist()[0][0], res.hidden_states[0])
    return out


def test_scores_match_a_direct_computation_and_the_mean_excludes_the_grid(cfg: Config, aesthetic_dir: Path) -> None:
    folder = _storyboard(cfg.storyboard_dir, n=5)
    result = score_folder(cfg)
    assert result.folder == cfg.storyboard_dir and result.model_folder == aesthetic_dir
    assert result.panels == [f"panel_{i:02d}.png" for i in range(1, 6)]
    assert result.excluded == ["storyboard.png"] and result.ignored == ["manifest.json"]
    direct = _direct_scores(aesthetic_dir, sorted(folder.glob("*.png")))
    assert set(result.scores) == set(direct)  # the grid is scored too, just not a panel
    for name, (score, _) in direct.items():
        assert result.scores[name] == pytest.approx(score, abs=1e-5)
    panel_mean = np.mean([direct[p][0] for p in result.panels])
    assert result.mean == pytest.approx(panel_mean, abs=1e-5)
    assert result.mean != pytest.approx(np.mean([s for s, _ in direct.values()]), abs=1e-7)
    # consistency uses the same model's embeddings
    e = torch.stack([direct[p][1] for p in result.panels]).double()
    sim = e @ e.T
    assert result.consistency == pytest.approx(float((sim.sum() - sim.trace()) / 20), abs=1e-5)
    assert "storyboard.png" not in result.consistency_to_others
    assert "not a panel" in str(result)


def test_non_panel_names() -> None:
    assert is_panel("panel_01.png") and is_panel("frame.jpg")
    assert not is_panel("storyboard.png") and not is_panel("Storyboard_grid.jpg")
    assert not is_panel("sweep_0.50.png")
    assert is_panel("sweep.png", non_panel=("storyboard",))


def test_gate_decides_pass_or_fail(cfg: Config) -> None:
    _storyboard(cfg.storyboard_dir)
    result = score_folder(cfg)
    assert result.gate == 6.0 and not result.passed  # a random model is far below the real gate
    assert score_folder(cfg, gate=result.mean).passed  # the rule is mean >= gate
    assert not score_folder(cfg, gate=result.mean + 1e-3).passed


def test_identical_panels_are_perfectly_consistent(cfg: Config) -> None:
    folder = cfg.storyboard_dir
    folder.mkdir(parents=True)
    for i in range(3):
        _panel(0).save(folder / f"panel_{i + 1:02d}.png")
    result = score_folder(cfg)
    assert result.consistency == pytest.approx(1.0, abs=1e-6)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in result.consistency_to_others.values())
    assert len(set(result.scores.values())) == 1


def test_planted_outlier_is_the_least_consistent(cfg: Config) -> None:
    _storyboard(cfg.storyboard_dir, n=6, outlier=3)
    result = score_folder(cfg)
    assert result.least_consistent == "panel_04.png"
    others = [v for k, v in result.consistency_to_others.items() if k != "panel_04.png"]
    assert result.consistency_to_others["panel_04.png"] < min(others) - 0.05
    # the (checkerboard) grid is not a panel, so it cannot be picked
    assert set(result.consistency_to_others) == set(result.panels)


def test_unreadable_files_are_reported_not_skipped(cfg: Config) -> None:
    folder = _storyboard(cfg.storyboard_dir, n=3)
    (folder / "manifest.json").unlink()  # damaged panels: a folder of images, not a whole board
    (folder / "panel_04.png").write_bytes(b"")
    (folder / "panel_05.jpg").write_text("not an image")
    good = (folder / "panel_01.png").read_bytes()
    (folder / "panel_06.png").write_bytes(good[: len(good) // 2])
    result = score_folder(cfg)
    reasons = {row["file"]: row["reason"] for row in result.unreadable}
    assert set(reasons) == {"panel_04.png", "panel_05.jpg", "panel_06.png"}
    assert "empty" in reasons["panel_04.png"] and "cannot decode" in reasons["panel_05.jpg"]
    assert result.unreadable_panels == ["panel_04.png", "panel_05.jpg", "panel_06.png"]
    assert result.panels == ["panel_01.png", "panel_02.png", "panel_03.png"]
    assert result.mean == pytest.approx(np.mean([result.scores[p] for p in result.panels]))
    assert "3 unreadable panel(s)" in str(result)
    report = json.loads(result.json_path.read_text())
    assert report["mean_over"] == {"panels": 3, "unreadable_panels": 3, "excluded_non_panels": ["storyboard.png"]}
    assert {r["file"] for r in report["unreadable"]} == set(reasons)


def test_truncated_file_is_unreadable_even_when_pil_is_lenient(cfg: Config) -> None:
    from PIL import ImageFile

    folder = _storyboard(cfg.storyboard_dir, n=2, grid=False)
    (folder / "manifest.json").unlink()  # damaged panels: a folder of images, not a whole board
    good = (folder / "panel_01.png").read_bytes()
    (folder / "panel_03.png").write_bytes(good[: len(good) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what Data-Juicer does at import
    try:
        result = score_folder(cfg)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert [r["file"] for r in result.unreadable] == ["panel_03.png"]


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "only_grid", "all_unreadable"])
def test_folders_that_cannot_be_scored(cfg: Config, tmp_path: Path, case: str) -> None:
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "no_images":
        (folder / "notes.txt").write_text("x")
    if case == "only_grid":
        _checker().save(folder / "storyboard.png")
    if case == "all_unreadable":
        (folder / "panel_01.png").write_bytes(b"")
    with pytest.raises(ScoreError, match=str(folder)):
        score_folder(cfg, folder)
    assert not (cfg.scores_dir / "scores.json").exists()


def test_reports_are_written_and_rerun_byte_identical(cfg: Config) -> None:
    _storyboard(cfg.storyboard_dir, n=4)
    first = score_folder(cfg, batch_size=3)
    assert first.csv_path == cfg.scores_dir / "scores.csv" and first.json_path == cfg.scores_dir / "scores.json"
    csv_bytes, json_bytes = first.csv_path.read_bytes(), first.json_path.read_bytes()
    again = score_folder(cfg, batch_size=3)
    assert again.csv_path.read_bytes() == csv_bytes and again.json_path.read_bytes() == json_bytes
    assert not [p for p in cfg.scores_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    lines = csv_bytes.decode().splitlines()
    assert lines[0] == "file,score,consistency_to_others,panel,error"
    assert lines[-1].startswith("storyboard.png,") and lines[-1].endswith(",,False,")
    report = json.loads(json_bytes)
    assert report["gate"] == 6.0 and report["passed"] is False
    assert report["mean"] == pytest.approx(first.mean, abs=1e-6)
    assert report["model"]["id"] == cfg.models.aesthetic.model_id
    assert report["consistency"]["least_consistent"] == first.least_consistent
    assert [f["file"] for f in report["files"]] == sorted(first.scores)
    table = first.table()
    assert list(table.columns) == ["file", "score", "consistency_to_others", "panel", "error"]
    assert table["panel"].tolist() == [True] * 4 + [False]


def test_figures(cfg: Config) -> None:
    from matplotlib.figure import Figure

    folder = _storyboard(cfg.storyboard_dir, n=5)
    (folder / "manifest.json").unlink()  # damaged panels: a folder of images, not a whole board
    (folder / "panel_06.png").write_bytes(b"")
    result = score_folder(cfg, write=False)
    assert result.csv_path is None and not cfg.scores_dir.exists()
    bars = result.bar_chart()
    assert isinstance(bars, Figure)
    ax = bars.axes[0]
    assert len(ax.patches) == 5
    assert sorted(line.get_ydata()[0] for line in ax.get_lines()) == sorted([6.0, result.mean])
    grid = result.annotated_grid(cols=4)
    titles = [a.get_title() for a in grid.axes if a.get_title()]
    assert titles[0] == f"panel_01 {result.scores['panel_01.png']:.2f}"
    assert titles[-1] == "panel_06 unreadable" and len(titles) == 6
    assert isinstance(result, ScoreResult)


def test_cli_output_gate_and_exit_codes(cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _storyboard(tmp_path / "board", n=3)
    base = [str(folder), "--profile", "tiny", "--workdir", str(cfg.workdir)]
    # reuse the module's predictor through a config file rather than writing tiny Kolors again
    conf = tmp_path / "score.yaml"
    model_dir = cfg.models.aesthetic.local_dir
    conf.write_text(f"profiles:\n  tiny:\n    models:\n      aesthetic: {{local_dir: '{model_dir}'}}\n")
    base += ["--config", str(conf)]

    assert cli_main(["score", *base, "--gate", "-100"]) == 0
    out = capsys.readouterr().out
    assert "panel_01.png" in out and "storyboard.png" in out and "mean over 3 panel(s)" in out
    assert "gate -100: PASS" in out and "style consistency" in out
    # issue 10.9: scores of another folder go beside it, never over the storyboard's
    assert (folder.parent / "board-scores" / "scores.json").is_file() and not cfg.scores_dir.exists()
    assert cli_main(["score", *base, "--gate", "-100", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "scores.json").is_file() and not cfg.scores_dir.exists()

    assert cli_main(["score", *base, "--gate", "100"]) == 0  # a FAIL is a result: exit 0, printed clearly
    assert "gate 100: FAIL" in capsys.readouterr().out
    assert cli_main(["score", *base, "--gate", "100", "--strict"]) == 1
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["score", str(empty), *base[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(empty) in err and "\n" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "panel_01.png").write_text("nope")
    assert cli_main(["score", str(bad), *base[1:]]) == 2
    assert "no readable panel" in capsys.readouterr().err
