"""Step 05: score the storyboard with the challenge's aesthetic predictor and measure style consistency.

`score_folder(cfg)` scores every image file in `cfg.storyboard_dir` (or any folder) the way the
challenge did: `AestheticsPredictorV2Linear` (CLIP ViT-L/14 + a linear head) on each image, and the
**mean over the panel files** compared with the gate (`cfg.score.gate`, 6.0 in the challenge).
Differences from the challenge's script, on purpose:

- the storyboard grid (`storyboard*.png`) and strength sweeps (`sweep*`) are scored but are not
  panels: they are left out of the mean and of the consistency, and the result says so;
- an unreadable file is reported (file + reason) instead of crashing the run; the mean is over the
  readable panels and the report says how many were unreadable;
- style consistency (30% of the judges' score): mean pairwise cosine similarity of the panels'
  CLIP image embeddings from the same model, and the panel least like the others.

It writes, atomically and without timestamps (a re-run is byte-identical):
`cfg.scores_dir/scores.csv` and `cfg.scores_dir/scores.json`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_lib.core.checks import finite
from kolors_lib.core.config import MANIFEST_FILE, SCORES_CSV, SCORES_JSON, Config
from kolors_lib.core.console import logged_step
from kolors_lib.core.console import progress as tqdm  # finished bars in saved notebooks
from kolors_lib.core.device_plan import device_plan
from kolors_lib.core.devices import resolve_device
from kolors_lib.core.errors import ScoreError
from kolors_lib.core.files import sha256_file, write_json, write_text
from kolors_lib.core.lock import one_writer

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "NON_PANEL_PREFIXES", "ScoreResult", "check_board", "is_panel", "score_folder",
           "write_scores"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# step 04 writes the grid as storyboard.png and LoRA-strength sweeps as sweep_*.png next to the panels
NON_PANEL_PREFIXES = ("storyboard", "sweep")
CSV_COLUMNS = ["file", "score", "consistency_to_others", "panel", "error"]
DIGITS = 6  # rounding in the written files: keeps them stable across BLAS/batch-size noise
# the predictor's processor scales the shorter side up to its crop (224 px); below this there is nothing to
# see, and an image 1 or 3 pixels wide is even taken for a channel axis by the processor
MIN_SIDE = 16


@dataclass
class ScoreResult:
    """Scores of one folder: per file, the panels' mean against the gate, and style consistency."""

    folder: Path
    scores: dict[str, float]
    panels: list[str]
    excluded: list[str]
    unreadable: list[dict[str, Any]]
    mean: float
    gate: float
    consistency: float | None
    consistency_to_others: dict[str, float]
    least_consistent: str | None
    model_id: str
    model_folder: Path
    ignored: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    json_path: Path | None = None
    embeddings: dict[str, Any] = field(default_factory=dict)  # file -> normalised CLIP image embedding

    @property
    def passed(self) -> bool:
        """True when the panels' mean reaches the gate (the challenge's rule: mean >= gate)."""
        return self.mean >= self.gate

    @property
    def unreadable_panels(self) -> list[str]:
        """Panel files that could not be read (they are not in the mean)."""
        return [row["file"] for row in self.unreadable if row["panel"]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per image file (readable or not), sorted by name: the CSV's rows."""
        errors = {row["file"]: row["reason"] for row in self.unreadable}
        names = sorted(set(self.scores) | set(errors))
        return [{"file": name, "score": self.scores.get(name), "consistency_to_others":
                 self.consistency_to_others.get(name), "panel": name not in self.excluded,
                 "error": errors.get(name)} for name in names]

    def table(self) -> pd.DataFrame:
        """The per-file rows as a DataFrame (non-panels and unreadable files included, flagged)."""
        import pandas as pd

        return pd.DataFrame(self.rows(), columns=CSV_COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data report (the content of scores.json): no timestamps, floats rounded."""
        return {
            "folder": str(self.folder),
            "model": {"id": self.model_id, "folder": str(self.model_folder)},
            "gate": self.gate,
            "mean": round_score(self.mean),
            "passed": self.passed,
            "mean_over": {"panels": len(self.panels), "unreadable_panels": len(self.unreadable_panels),
                          "excluded_non_panels": self.excluded},
            "consistency": {"mean_pairwise_cosine": round_score(self.consistency),
                            "least_consistent": self.least_consistent,
                            "to_others": {k: round_score(v) for k, v in self.consistency_to_others.items()}},
            "files": [{**row, "score": round_score(row["score"]),
                       "consistency_to_others": round_score(row["consistency_to_others"])} for row in self.rows()],
            "unreadable": self.unreadable,
            "ignored_non_images": self.ignored,
        }

    def __str__(self) -> str:
        lines = [f"scores of {self.folder} ({self.model_id})"]
        for row in self.rows():
            if row["error"] is not None:
                lines.append(f"  {row['file']:<28} UNREADABLE: {row['error']}")
                continue
            note = "" if row["panel"] else "  (not a panel: not in the mean)"
            lines.append(f"  {row['file']:<28} {row['score']:8.3f}{note}")
        unread = f", {len(self.unreadable_panels)} unreadable panel(s) left out" if self.unreadable_panels else ""
        lines.append(f"mean over {len(self.panels)} panel(s){unread}: {self.mean:.3f}")
        verdict, sign = ("PASS", ">=") if self.passed else ("FAIL", "<")
        lines.append(f"gate {self.gate:g}: {verdict} (mean {self.mean:.3f} {sign} {self.gate:g})")
        if self.consistency is None:
            lines.append("style consistency: n/a (needs at least 2 readable panels)")
        else:
            least = f", least consistent: {self.least_consistent}" if self.least_consistent else ""
            lines.append(f"style consistency (mean pairwise cosine): {self.consistency:.4f}{least}")
        return "\n".join(lines)

    def bar_chart(self) -> Figure:
        """One bar per readable panel, with the gate and the mean as horizontal lines."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(4.0, 0.7 * len(self.panels) + 2), 3.2), dpi=100)
        ax = fig.subplots()
        names = [Path(p).stem for p in self.panels]
        values = [self.scores[p] for p in self.panels]
        colours = ["tab:green" if v >= self.gate else "tab:red" for v in values]
        ax.bar(names, values, color=colours)
        ax.axhline(self.gate, color="black", linestyle="--", label=f"gate {self.gate:g}")
        ax.axhline(self.mean, color="tab:blue", label=f"mean {self.mean:.2f}")
        ax.set_ylabel("aesthetic score")
        ax.set_title(f"{'PASS' if self.passed else 'FAIL'}: mean {self.mean:.2f} vs gate {self.gate:g}")
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig

    def annotated_grid(self, cols: int = 4) -> Figure:
        """The panel files in a grid, each titled with its score (e.g. "panel_01 6.42")."""
        from kolors_lib.core.images import image_grid

        # unreadable panels stay in the grid (the grid draws a placeholder) so gaps are visible
        names = sorted(set(self.panels) | set(self.unreadable_panels))
        titles = [f"{Path(n).stem} {self.scores[n]:.2f}" if n in self.scores else f"{Path(n).stem} unreadable"
                  for n in names]
        return image_grid([self.folder / n for n in names], titles, cols=cols)


# ---------------------------------------------------------------- files


def round_score(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def is_panel(name: str, non_panel: Sequence[str] = NON_PANEL_PREFIXES) -> bool:
    """False for the storyboard grid, sweeps and other names starting with a `non_panel` prefix."""
    return not Path(name).name.lower().startswith(tuple(p.lower() for p in non_panel))


def _list_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Image files and other files directly in `folder` (like the challenge: no sub-folders)."""
    if not folder.exists():
        raise ScoreError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise ScoreError(f"not a folder: {folder}")
    # hidden files are editor/atomic-write leftovers, never panels
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return images, [n for n in names if n not in images]


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Make a truncated file an error even if Data-Juicer set LOAD_TRUNCATED_IMAGES in this process."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _read_image(path: Path) -> Image.Image:
    """Decode `path` fully as RGB; raise ValueError with a short reason when it cannot be."""
    from PIL import Image

    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with _strict_pil(), Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not inside the processor
            if min(img.size) < MIN_SIDE:
                raise ValueError(f"too small for the aesthetic predictor: {img.width}x{img.height} pixels "
                                 f"(at least {MIN_SIDE} a side)")
            # the processor would also convert; doing it here keeps the pixels identical either way
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ValueError(f"too many pixels: {err}") from None
    except (OSError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode as an image: {err}") from None
    except ValueError as err:
        if str(err).startswith("too small"):
            raise
        raise ValueError(f"cannot decode as an image: {err}") from None


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else round_score(row[c]) if isinstance(row[c], float) else row[c]
                         for c in CSV_COLUMNS])
    return buf.getvalue()


def write_scores(result: ScoreResult, dest: Path) -> tuple[Path, Path]:
    """Write `scores.csv` and `scores.json` into `dest` atomically; return their paths."""
    dest = Path(dest)
    csv_path, json_path = dest / SCORES_CSV, dest / SCORES_JSON
    write_text(csv_path, _csv_text(result.rows()))
    write_json(result.to_dict(), json_path)
    return csv_path, json_path


# ---------------------------------------------------------------- model


def load_predictor(folder: Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The aesthetic predictor (eval mode: its head has dropout) and its CLIP image processor."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()  # before transformers' image code imports torchvision
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor

    # fp32 everywhere: the challenge scored in fp32, and fp16 would move scores near the gate
    model = AestheticsPredictorV2Linear.from_pretrained(folder).to(device).eval()
    # the real repo also has tokenizer files (CLIPProcessor); only the image half is used
    return model, CLIPImageProcessor.from_pretrained(folder)


def style_consistency(embeds: dict[str, Any]) -> tuple[float | None, dict[str, float], str | None]:
    """Mean pairwise cosine similarity, each panel's mean similarity to the others, the least consistent."""
    import torch

    names = sorted(embeds)
    if len(names) < 2:
        return None, {}, None
    # float64 so that identical images give exactly 1.0 after rounding, whatever the order
    e = torch.stack([embeds[n] for n in names]).double()
    e = e / e.norm(dim=-1, keepdim=True)
    sim = e @ e.T
    n = len(names)
    off = sim.sum() - sim.diagonal().sum()
    to_others = ((sim.sum(dim=1) - sim.diagonal()) / (n - 1)).tolist()
    per = dict(zip(names, to_others, strict=True))
    # with two panels both are equally (in)consistent: naming one would be arbitrary
    least = min(names, key=lambda k: (per[k], k)) if n >= 3 else None
    return float(off / (n * (n - 1))), per, least


# ---------------------------------------------------------------- scoring


def scores_dest(cfg: Config, folder: Path, out: str | Path | None = None) -> Path:
    """Where the report of `folder` goes: `out`, cfg.scores_dir for the storyboard, else `<folder>-scores` beside it."""
    if out is not None:
        return Path(out)
    if folder.resolve() == cfg.storyboard_dir.resolve():
        return cfg.scores_dir
    return folder.resolve().parent / f"{folder.resolve().name}-scores"


def _score_images(folder: Path, images: list[str], model: Any, processor: Any, dev: str, batch_size: int,
                  non_panel: Sequence[str]) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    """Aesthetic scores and image embeddings of `images`, batch by batch; unreadable files are listed, not fatal."""
    import torch

    scores: dict[str, float] = {}
    embeds: dict[str, torch.Tensor] = {}
    unreadable: list[dict[str, Any]] = []
    with tqdm(total=len(images), desc="aesthetic score", unit="img") as bar:
        # batches bound memory on big sweep folders; images are decoded one batch at a time
        for start in range(0, len(images), max(1, batch_size)):
            batch, pixels = [], []
            for name in images[start:start + batch_size]:
                try:
                    pixels.append(_read_image(folder / name))
                    batch.append(name)
                except ValueError as err:
                    unreadable.append({"file": name, "reason": str(err), "panel": is_panel(name, non_panel)})
            if batch:
                inputs = processor(images=pixels, return_tensors="pt", input_data_format="channels_last")
                with torch.no_grad():
                    out = model(pixel_values=inputs["pixel_values"].to(dev))
                for i, name in enumerate(batch):
                    scores[name] = float(out.logits[i, 0])
                    embeds[name] = out.hidden_states[i].detach().float().cpu()  # already L2-normalised
            bar.update(len(images[start:start + batch_size]))
    return scores, embeds, unreadable


def check_board(folder: Path) -> None:
    """A storyboard folder (one with step 04's manifest.json) must hold exactly the panels its manifest lists,
    byte for byte (sha256): otherwise the mean would score a board nobody rendered."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        listed = {p["file"]: p["sha256"] for p in json.loads(path.read_text(encoding="utf-8"))["panels"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ScoreError(f"{path} is not step 04's manifest ({type(err).__name__}): re-run step 04") from None
    panels = {p.name for p in folder.glob("panel_*.png")}
    wrong = sorted(panels ^ set(listed)) + sorted(n for n in panels & set(listed)
                                                  if sha256_file(folder / n) != listed[n])
    if wrong:
        raise ScoreError(f"{folder}: {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''} do(es) not match "
                         f"{MANIFEST_FILE} (missing, extra or changed since step 04 wrote it): re-run step 04, "
                         "or score a folder of images without a manifest")


@logged_step("05_score")
@one_writer("score")
def score_folder(
    cfg: Config,
    folder: str | Path | None = None,
    device: str | None = None,
    gate: float | None = None,
    batch_size: int = 8,
    non_panel: Sequence[str] = NON_PANEL_PREFIXES,
    write: bool = True,
    out: str | Path | None = None,
) -> ScoreResult:
    """Score every image in `folder` (default: the storyboard); gate the panels' mean; write the report.

    The report goes to `out`, else cfg.scores_dir for the storyboard, else `<folder>-scores` beside another
    folder: scores of other images must never stand in for the storyboard's (step 06 publishes those).
    """
    folder = Path(folder) if folder is not None else cfg.storyboard_dir
    dest = scores_dest(cfg, folder, out)
    if folder == cfg.storyboard_dir and not folder.is_dir():
        raise ScoreError(f"the storyboard {folder} is missing: run step 04 (python -m kolors_lib storyboard "
                         f"--workdir {cfg.workdir}) first, or give a folder of images to score")
    gate = finite(cfg.score.gate if gate is None else gate, "gate")  # nan would fail every board silently
    images, others = _list_folder(folder)
    check_board(folder)
    if not images:
        extra = f" (only non-image files: {', '.join(others)})" if others else ""
        raise ScoreError(f"no image files to score in {folder}{extra}")
    if not any(is_panel(n, non_panel) for n in images):
        raise ScoreError(f"no panel images in {folder}: only non-panel files {', '.join(images)}")
    import torch  # only now: a missing or empty folder is reported at once

    from kolors_lib.kolors.models import resolve_model

    model_folder = resolve_model(cfg, "aesthetic")
    # `device` when given, else where the device plan puts the predictor; CUDA falls back to CPU without one
    dev = resolve_device(device or device_plan(cfg).get("score", "aesthetic").device)
    model, processor = load_predictor(model_folder, dev)

    scores, embeds, unreadable = _score_images(folder, images, model, processor, dev, batch_size, non_panel)
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    panels = [n for n in images if n in scores and is_panel(n, non_panel)]
    if not panels:
        reasons = "; ".join(f"{r['file']}: {r['reason']}" for r in unreadable if r["panel"])
        raise ScoreError(f"no readable panel image in {folder} ({reasons})")
    consistency, to_others, least = style_consistency({n: embeds[n] for n in panels})
    result = ScoreResult(
        folder=folder, scores=scores, panels=panels, excluded=[n for n in images if not is_panel(n, non_panel)],
        unreadable=unreadable, mean=sum(scores[n] for n in panels) / len(panels),
        gate=gate, consistency=consistency,
        consistency_to_others=to_others, least_consistent=least, model_id=cfg.models.aesthetic.model_id,
        model_folder=model_folder, ignored=others, embeddings=embeds)
    if write:
        result.csv_path, result.json_path = write_scores(result, dest)
    return result
