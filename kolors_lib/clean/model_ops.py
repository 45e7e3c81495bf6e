"""Step 02's model-backed Data-Juicer ops: fill in their models from the course config, read their results.

The recipe says which ops run and in which order; the course config says which model each uses
and the thresholds that differ per profile. `prepare_model_ops` rewrites the recipe's entries:

- `image_aesthetics_filter`: the challenge's predictor (`models.aesthetic`) and
  `filter.aesthetic_min_score` on the challenge's 0-10 scale. Data-Juicer picks the predictor class
  from the substrings "v2"/"linear" of the model path and divides scores by 10 only when the path
  contains "aesthetics-predictor"; so it always gets a link with the canonical repo name, and the
  threshold is divided by `DJ_AESTHETIC_SCALE`. A renamed local folder cannot change the scale.
- `image_watermark_filter` / `image_nsfw_filter`: run only when `models.watermark` / `models.nsfw`
  name a complete local folder (or a complete copy sits in the ModelScope cache); otherwise they
  are left out with a one-line notice. They are never downloaded.
- `kolors_caption_mapper`: the captioning VLM (`models.captioner`, resolved like every model:
  download or local_dir, fails fast offline naming the override) and `filter.caption_*`;
  left out when `filter.caption_mode` is `keep`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kolors_lib.clean.recipe import op_name
from kolors_lib.core.config import Config
from kolors_lib.core.device_plan import caption_device
from kolors_lib.core.errors import RecipeModelError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AESTHETIC_OP = "image_aesthetics_filter"
CAPTION_OP = "kolors_caption_mapper"
# op -> (models.<key>, the op's model argument)
OPTIONAL_OPS = {"image_watermark_filter": ("watermark", "hf_watermark_model"),
                "image_nsfw_filter": ("nsfw", "hf_nsfw_model")}
# the name Data-Juicer must see: "v2" + "linear" -> AestheticsPredictorV2Linear, "aesthetics-predictor" -> ÷10
CANONICAL_AESTHETIC = "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
DJ_AESTHETIC_SCALE = 10.0
SCORE_STAT = "image_aesthetics_scores"
# arguments step 02 owns: set them in the course config, not in the recipe
OWNED_ARGS = {
    AESTHETIC_OP: ("hf_scorer_model", "min_score", "max_score"),
    CAPTION_OP: ("model_path", "mode", "instruction", "gen_batch_size", "max_new_tokens", "max_pixels", "device"),
    **{op: (arg,) for op, (_, arg) in OPTIONAL_OPS.items()},
}
OPTIONAL_REQUIRED = ("config.json", "preprocessor_config.json")


@dataclass
class ModelOps:
    """The recipe's process list with models filled in, and what was decided on the way."""

    process: list[dict[str, Any]]
    caption_mode: str = "keep"
    aesthetic_min_score: float | None = None
    notices: list[str] = field(default_factory=list)


def aesthetic_link(folder: Path, dj_dir: Path) -> Path:
    """A symlink named like the challenge's repo pointing at `folder`: the path Data-Juicer gets."""
    link = Path(dj_dir) / "models" / CANONICAL_AESTHETIC
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    return link


def optional_model(cfg: Config, key: str) -> Path | None:
    """A complete local folder for an optional model (local_dir, else the ModelScope cache); no network."""
    from kolors_lib.core.downloads import repo_folders
    from kolors_lib.kolors.models import model_cache

    source = getattr(cfg.models, key)
    # every layout modelscope 1.40.2 writes or reuses (its own: models/<owner>--<name>/snapshots/master)
    for folder in (source.local_dir, *repo_folders(model_cache(cfg), source.model_id)):
        if folder is not None and all((Path(folder) / name).is_file() for name in OPTIONAL_REQUIRED):
            return Path(folder)
    return None


def prepare_model_ops(cfg: Config, process: list[Any], dj_dir: Path, recipe_path: Path) -> ModelOps:
    """Fill in the model ops of `process` from `cfg`; drop the ones that are off (see the module doc)."""
    from kolors_lib.kolors.models import resolve_model

    out = ModelOps(process=[])
    for entry in process:
        name, args = op_name(entry)
        owned = [a for a in OWNED_ARGS.get(name, ()) if a in args]
        if owned:
            raise RecipeModelError(
                f"{recipe_path}: {name}.{owned[0]} is set by step 02 from the course config "
                f"(models.* and filter.*); remove it from the recipe")
        if name == AESTHETIC_OP:
            link = aesthetic_link(resolve_model(cfg, "aesthetic"), dj_dir)
            out.aesthetic_min_score = float(cfg.filter.aesthetic_min_score)
            args.update(hf_scorer_model=str(link), min_score=out.aesthetic_min_score / DJ_AESTHETIC_SCALE,
                        max_score=sys.float_info.max)
            args.setdefault("num_proc", 1)  # one model copy
        elif name in OPTIONAL_OPS:
            key, arg = OPTIONAL_OPS[name]
            folder = optional_model(cfg, key)
            if folder is None:
                out.notices.append(f"{name} skipped: no model folder (set models.{key}.local_dir to a local copy "
                                   f"of {getattr(cfg.models, key).model_id} to use it)")
                continue
            args[arg] = str(folder)
        elif name == CAPTION_OP:
            if cfg.filter.caption_mode == "keep":
                continue
            f = cfg.filter
            args.update(model_path=str(resolve_model(cfg, "captioner")), mode=f.caption_mode,
                        instruction=f.caption_instruction, gen_batch_size=f.caption_batch_size,
                        max_new_tokens=f.caption_max_new_tokens, max_pixels=f.caption_max_pixels,
                        device=caption_device(cfg))  # the device plan picks it
            # one model copy; and torch in forked workers can hang once the parent has used its threads
            args.setdefault("num_proc", 1)
            out.caption_mode = f.caption_mode
        if name == AESTHETIC_OP or name in OPTIONAL_OPS:
            # Data-Juicer 1.6.1 traces a per-sample filter's removals only in batch mode (without it the
            # traces stay empty and attribution cannot name this op)
            args.setdefault("batch_mode", True)
        out.process.append({name: args})
    for line in out.notices:
        print(f"NOTICE: {line}", file=sys.stderr)
    return out


# ---------------------------------------------------------------- results


def _rows(value: Any) -> list[dict[str, Any]]:
    """Rows with an id inside one trace line: a row itself, or the rows of a duplicate pair."""
    if isinstance(value, dict) and "id" in value:
        return [value]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, dict) and "id" in v]
    return []


def aesthetic_scores(job_dir: Path, kept_rows: list[dict[str, Any]]) -> dict[str, float]:
    """id -> score on the challenge's 0-10 scale, for every image the aesthetic filter scored."""
    rows = list(kept_rows)
    trace_dir = Path(job_dir) / "trace"
    if trace_dir.is_dir():
        for path in sorted(trace_dir.glob("*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        rows.extend(_rows(json.loads(line)))
    scores: dict[str, float] = {}
    for row in rows:
        values = (row.get("__dj__stats__") or {}).get(SCORE_STAT)
        if values:
            scores[str(row["id"])] = round(float(values[0]) * DJ_AESTHETIC_SCALE, 4)
    return scores


def describe_score(stats: dict[str, Any]) -> str:
    """The aesthetic filter's value for a removed image, on the 0-10 scale ('score 4.31')."""
    values = stats.get(SCORE_STAT)
    return f"score {float(values[0]) * DJ_AESTHETIC_SCALE:.2f}" if values else ""



def caption_sources(items: list[Any], kept_rows: list[dict[str, Any]], placeholder: str) -> dict[str, str]:
    """id -> 'generated' (the VLM wrote it), 'original' (imported) or 'default' (placeholder) for kept rows."""
    sent = {it.id: it.text for it in items}
    out: dict[str, str] = {}
    for row in kept_rows:
        item_id = str(row["id"])
        text = str(row.get("text") or "").strip()
        if text and text != sent.get(item_id, "").strip():
            out[item_id] = "generated"
        else:
            out[item_id] = "original" if text and text != placeholder else "default"
    return out


def blank_placeholder(text: str, placeholder: str, mode: str) -> str:
    """The text Data-Juicer gets: in `fill` mode step 01's placeholder caption counts as no caption."""
    return "" if mode == "fill" and text.strip() in ("", placeholder.strip()) else text


def apply_results(cfg: Config, items: list[Any], kept_ids: list[str], kept_rows: list[dict[str, Any]],
                  removed: list[dict[str, Any]], job_dir: Path, ops: ModelOps | None,
                  swapped: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Put Data-Juicer's captions on the kept items and scores on the removed rows; per-image report rows."""
    from kolors_lib.clean.recipe import build_caption

    placeholder = cfg.data.default_caption
    rows = {str(r["id"]): r for r in kept_rows}
    rows.update({first: rows[twin] for first, twin in swapped.items() if twin in rows})
    pairs = [(i, rows[i]) for i in kept_ids if i in rows]
    sources = caption_sources(items, [{**r, "id": i} for i, r in pairs], placeholder)
    scored = ops is not None and ops.aesthetic_min_score is not None
    scores = aesthetic_scores(job_dir, [r for _, r in pairs]) if scored else {}
    by_id = {it.id: it for it in items}
    for item_id in kept_ids:
        it, row = by_id[item_id], rows.get(item_id)
        # Data-Juicer's text is the caption (generated or as sent); an empty one gets the camp's default
        text = str(row.get("text") or "").strip() if row else it.text
        it.text = text or placeholder
    for row in removed:
        row["aesthetic"] = scores.get(row["id"])
    gone = {r["id"]: r["op"] for r in removed}
    f = cfg.filter
    images = []
    for it in items:
        kept = it.id not in gone
        images.append({
            "id": it.id, "image": it.image, "status": "kept" if kept else "removed", "op": gone.get(it.id, ""),
            "aesthetic": scores.get(it.id),
            "caption": build_caption(it.text, f.trigger_word, f.add_tags, f.remove_tags) if kept else "",
            "caption_source": sources.get(it.id, "original" if it.text != placeholder else "default") if kept else "",
        })
    extra = {"aesthetic_min_score": ops.aesthetic_min_score if ops else None,
             "caption_mode": ops.caption_mode if ops else cfg.filter.caption_mode,
             "generated_captions": sorted(i for i, s in sources.items() if s == "generated"),
             "notices": ops.notices if ops else []}
    return images, extra


def show_captions(result: Any, cols: int = 4, thumb: int = 200, only_kept: bool = False) -> Figure:
    """Thumbnails titled with id, aesthetic score and caption (kept) or the op that removed them."""
    import textwrap

    from matplotlib.figure import Figure
    from PIL import Image

    from kolors_lib.core.images import font_properties

    rows = [r for r in result.images if r["status"] == "kept" or not only_kept]
    ncols = max(1, min(cols, len(rows)))
    nrows = max(1, -(-len(rows) // ncols))
    inch = thumb / 100
    fig = Figure(figsize=(ncols * inch, nrows * (inch + 0.9)), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    font = font_properties("".join(r["caption"] for r in rows))
    for ax in axes.flat:
        ax.axis("off")
    raw_dir = Path(result.raw_dir) if result.raw_dir else result.train_dir.parent.parent / "raw"
    for ax, row in zip(axes.flat, rows, strict=False):
        try:
            with Image.open(raw_dir / row["image"]) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                ax.imshow(im)
        except OSError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        score = "" if row["aesthetic"] is None else f" {row['aesthetic']:.2f}"
        text = f"{row['caption']} ({row['caption_source']})" if row["status"] == "kept" else f"removed: {row['op']}"
        lines = textwrap.wrap(text, width=max(12, thumb // 9))[:4]
        ax.set_title("\n".join([f"{row['id']}{score}", *lines]), fontsize=7, fontproperties=font)
    fig.tight_layout()
    return fig
