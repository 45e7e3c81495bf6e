"""Step 02: clean the raw images with a Data-Juicer recipe and write DiffSynth's training layout.

`filter_dataset(cfg)` reads `cfg.raw_dir` (written by step 01), runs the recipe in
`cfg.filter.recipe` through Data-Juicer's Python API (default or Ray executor), attributes every
removed image to the op that removed it, builds kohya-style captions and writes, atomically:

- `cfg.train_dir/`: the kept images and `metadata.csv` (`file_name,text`);
- `cfg.clean_dir/report.json` and `removed.csv`: per-op counts and one row per removed image.

Data-Juicer's scratch files (input jsonl, resolved recipe, run folder with traces and logs)
live under `cfg.clean_dir/"dj"`.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kolors_lib.clean.dj_runtime import run_data_juicer
from kolors_lib.clean.recipe import DEDUP_OPS, RawItem, build_caption, load_recipe, op_name, read_jsonl
from kolors_lib.core.config import Config
from kolors_lib.core.console import logged_step
from kolors_lib.core.console import progress as tqdm  # finished bars in saved notebooks
from kolors_lib.core.errors import FilterError
from kolors_lib.core.files import recover_folder, staged_folder, write_json, write_text
from kolors_lib.core.lock import one_writer

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["FilterResult", "filter_dataset", "read_raw", "show_removed"]

REMOVED_COLUMNS = ["id", "image", "source", "op", "value", "aesthetic"]
IMAGE_COLUMNS = ["id", "image", "status", "op", "aesthetic", "caption", "caption_source"]


@dataclass
class FilterResult:
    """What step 02 produced: the training folder, per-op counts and the removed images."""

    train_dir: Path
    kept: int
    removed: list[dict[str, Any]]
    ops: list[dict[str, Any]]
    report_path: Path
    executor: str = "default"
    input: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    raw_dir: Path | None = None
    images: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """Per-op counts, in recipe order."""
        import pandas as pd

        return pd.DataFrame(self.ops, columns=["op", "removed", "remaining"])

    def removed_table(self) -> pd.DataFrame:
        """One row per removed image, with the op that removed it and why."""
        import pandas as pd

        return pd.DataFrame(self.removed, columns=REMOVED_COLUMNS)

    def images_table(self) -> pd.DataFrame:
        """One row per input image: kept or removed (by which op), aesthetic score, final caption."""
        import pandas as pd

        return pd.DataFrame(self.images, columns=IMAGE_COLUMNS)


# ---------------------------------------------------------------- captions


def csv_safe_caption(caption: str, default: str, item_id: str) -> str:
    """`caption`, unless DiffSynth's pandas loader would read it back as missing (NaN): then `default`.

    pandas turns the text `NA`, `null`, `None`, `nan` (quoted or not) and an empty field into NaN, which
    DiffSynth's trainer would then feed to the tokenizer as a float.
    """
    from pandas._libs.parsers import STR_NA_VALUES

    if caption not in STR_NA_VALUES:
        return caption
    if default.strip() and default.strip() not in STR_NA_VALUES:
        return default.strip()
    raise FilterError(f"image {item_id}: caption {caption!r} would be read as missing (NaN) by DiffSynth's "
                      "metadata.csv loader: set filter.trigger_word or data.default_caption to a real caption")


# ---------------------------------------------------------------- raw input


def read_raw(raw_dir: Path, default_caption: str = "") -> tuple[list[RawItem], list[dict[str, Any]]]:
    """Read step 01's `metadata.jsonl`; return the usable rows and the skipped (unreadable) ones."""
    from PIL import Image

    from kolors_lib.core.errors import DataError
    from kolors_lib.data.importer import iter_metadata

    raw_dir = recover_folder(raw_dir)  # a swap killed half-way is undone first
    meta = raw_dir / "metadata.jsonl"
    try:
        rows = list(iter_metadata(raw_dir))
    except DataError as err:
        raise FilterError(str(err)) from None
    root = raw_dir.resolve()
    items: list[RawItem] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, row in tqdm(rows, desc="check raw images", leave=False):
        where = f"{meta}:{lineno}"
        images = row["images"]
        if len(images) != 1:
            raise FilterError(f"{where}: 'images' must be a list with one image path")
        rel = images[0]
        path = (root / rel).resolve()
        item_id = str(row["id"])
        if item_id in seen:
            raise FilterError(f"{where}: id {item_id!r} already used on line {seen[item_id]}")
        seen[item_id] = lineno
        source = str(row.get("source", ""))
        item = RawItem(item_id, rel, path, row["text"].strip() or default_caption, source, lineno)
        # decode fully now: inside Data-Juicer a broken file is swallowed by skip_op_error
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
            skipped.append({"id": item_id, "image": rel, "source": item.source, "line": lineno,
                            "reason": f"unreadable image: {type(err).__name__}: {err}"})
            continue
        items.append(item)
    if not items and not skipped:
        raise FilterError(f"{meta} lists no images: run step 01 (`python -m kolors_lib data import`)")
    return items, skipped


# ---------------------------------------------------------------- Data-Juicer


def resolve_recipe(
    recipe: dict[str, Any], dj_dir: Path, n: int, num_proc: int, executor: str
) -> dict[str, Any]:
    """Fill in the paths, process count and executor settings this step owns."""
    out = dict(recipe)
    run_dir = dj_dir / executor
    # a `dataset` config, not `dataset_path`: Data-Juicer splits dataset_path on whitespace
    # (weights and several paths), so a work dir under "My Projects/" would not load
    out.pop("dataset_path", None)
    out.update(
        dataset={"configs": [{"type": "local", "path": str(dj_dir / "input.jsonl")}]},
        work_dir=str(run_dir),
        np=int(num_proc),
        # attribution reads every removed row from the traces, so trace all of them
        open_tracer=True,
        trace_num=max(n, 1),
        # kept rows carry their image hash (dedup attribution needs no re-hashing) and aesthetic score
        keep_hashes_in_res_ds=True,
        keep_stats_in_res_ds=True,
        # stats are cached by file fingerprint, which misses an image changed on disk
        use_cache=False,
        # an op that raises must stop the step: skipping drops the sample silently and the removal
        # is then blamed on another op (a predictor without its tokenizer "deduplicated" every image)
        skip_op_error=False,
        # the per-op resource monitor forks a Manager process; forked after torch has run its threads
        # (the aesthetic filter, the captioner) it can hang, and its numbers are not used here
        open_monitor=False,
    )
    if executor == "ray":
        out.update(executor_type="ray", ray_address=out.get("ray_address") or "local",
                   export_path=str(run_dir / "result"))
        # the default deduplicator refuses Ray mode; its Ray twin hashes the same way
        ops = map(op_name, recipe["process"])
        out["process"] = [{DEDUP_OPS.get(name, name): args} for name, args in ops]
    else:
        out.update(executor_type="default", export_path=str(run_dir / "result.jsonl"))
    # attribution reads filter and dedup traces only; tracing the captioner would send every caption
    # through the tracer's Manager process, which can hang once this process has run torch threads
    from kolors_lib.clean.model_ops import CAPTION_OP

    out["op_list_to_trace"] = [n for n, _ in map(op_name, out["process"]) if n != CAPTION_OP]
    return out


def read_export(export_path: Path) -> list[dict[str, Any]]:
    """Kept rows: one jsonl file (default executor) or a folder of jsonl shards (Ray)."""
    if export_path.is_dir():
        rows: list[dict[str, Any]] = []
        shards = sorted(p for p in export_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
        for shard in shards:
            rows.extend(read_jsonl(shard))
        return rows
    if not export_path.is_file():
        raise FilterError(f"Data-Juicer wrote no result at {export_path}: logs in {export_path.parent}")
    return read_jsonl(export_path)


# ---------------------------------------------------------------- outputs


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


FAILED_REPORT = "report.failed.json"  # the report of a run that kept nothing (the previous pair stays)


def write_train_dir(cfg: Config, kept: list[RawItem]) -> Path:
    """Copy the kept images and write `metadata.csv` into a fresh folder, then swap it in."""
    with staged_folder(cfg.train_dir) as tmp:
        names: set[str] = set()
        rows: list[list[Any]] = []
        for it in tqdm(kept, desc="copy kept images", leave=False):
            # ids are unique, file names only within one folder of raw_dir
            name = it.path.name if it.path.name not in names else f"{it.id}_{it.path.name}"
            names.add(name)
            shutil.copy2(it.path, tmp / name)
            f = cfg.filter
            rows.append([name, csv_safe_caption(build_caption(it.text, f.trigger_word, f.add_tags, f.remove_tags),
                                                cfg.data.default_caption, it.id)])
        (tmp / "metadata.csv").write_text(_csv_text(["file_name", "text"], rows), encoding="utf-8", newline="")
    return cfg.train_dir


def write_report(clean_dir: Path, report: dict[str, Any], name: str = "report.json") -> Path:
    """Write `report.json` and `removed.csv` (same rows) atomically; a failed run's report goes to `name` alone."""
    clean_dir.mkdir(parents=True, exist_ok=True)
    if name == "report.json":
        rows = [["" if r.get(c) is None else r[c] for c in REMOVED_COLUMNS] for r in report["removed"]]
        write_text(clean_dir / "removed.csv", _csv_text(REMOVED_COLUMNS, rows))
    return write_json(report, clean_dir / name)


# ---------------------------------------------------------------- the step


@dataclass
class _RecipeRun:
    """What one Data-Juicer run of the recipe kept and removed, per image and per op."""

    kept_rows: list[dict[str, Any]]
    job_dir: Path
    swapped: dict[str, Any]
    kept_ids: list[str]
    ops: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    model_ops: Any = None  # model_ops.ModelOps when the recipe ran


def _write_input(cfg: Config, items: list[RawItem], path: Path, caption_mode: Any) -> None:
    """Data-Juicer's input.jsonl: one row per raw image, blank captions as the captioner's placeholder."""
    from kolors_lib.clean.model_ops import blank_placeholder

    with open(path, "w", encoding="utf-8") as fh:
        for it in items:
            # absolute paths: Data-Juicer resolves relative ones against its own guesses
            text = blank_placeholder(it.text, cfg.data.default_caption, caption_mode)
            row = {"id": it.id, "images": [str(it.path)], "text": text, "source": it.source}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _run_recipe(cfg: Config, items: list[RawItem], recipe_data: dict[str, Any], recipe_path: Path,
                executor: str) -> _RecipeRun:
    """Run the recipe on `items` in a fresh cfg.clean_dir/dj and attribute every removal to its op."""
    # scratch space: stale job folders and traces would mislead the attribution
    dj_dir = cfg.clean_dir / "dj"
    if dj_dir.exists():
        shutil.rmtree(dj_dir)
    dj_dir.mkdir(parents=True)
    if not items:
        ops = [{"op": op_name(e)[0], "removed": 0, "remaining": 0} for e in recipe_data["process"]]
        return _RecipeRun([], dj_dir, {}, [], ops, [])
    from kolors_lib.clean.attribution import Attribution
    from kolors_lib.clean.model_ops import prepare_model_ops

    model_ops = prepare_model_ops(cfg, recipe_data["process"], dj_dir, recipe_path)
    recipe_data = {**recipe_data, "process": model_ops.process}
    _write_input(cfg, items, dj_dir / "input.jsonl", model_ops.caption_mode)
    resolved = resolve_recipe(recipe_data, dj_dir, len(items), cfg.filter.num_proc, executor)
    resolved_path = dj_dir / "recipe.yaml"
    resolved_path.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")
    job_dir = run_data_juicer(resolved_path, executor, str(resolved.get("ray_address", "local")))
    kept_rows = read_export(Path(resolved["export_path"]))
    attribution = Attribution(items, kept_rows, job_dir)
    kept_ids, ops, removed = attribution.run(recipe_data["process"])
    return _RecipeRun(kept_rows, job_dir, attribution.swapped, kept_ids, ops, removed, model_ops)


@logged_step("02_filter")
@one_writer("filter")
def filter_dataset(cfg: Config, recipe: Path | None = None, executor: str | None = None) -> FilterResult:
    """Step 02: run the Data-Juicer recipe on `cfg.raw_dir` and write the training folder and report."""
    executor = executor or cfg.filter.executor or "default"
    if executor not in ("default", "ray"):
        raise FilterError(f"executor must be 'default' or 'ray', not {executor!r}")
    items, skipped = read_raw(cfg.raw_dir, cfg.data.default_caption)
    recipe_path = Path(recipe or cfg.filter.recipe)
    recipe_data = load_recipe(recipe_path)

    run = _run_recipe(cfg, items, recipe_data, recipe_path, executor)
    kept_ids, ops, removed = run.kept_ids, run.ops, run.removed

    by_id = {it.id: it for it in items}
    from kolors_lib.clean.model_ops import apply_results

    images, extra = apply_results(cfg, items, kept_ids, run.kept_rows, removed, run.job_dir, run.model_ops,
                                  run.swapped)
    report = {
        "input": len(items) + len(skipped),
        "kept": len(kept_ids),
        "executor": executor,
        "recipe": str(recipe_path),
        "ops": ops,
        "removed": removed,
        "skipped": skipped,
        **extra,
        "images": images,
    }
    if not kept_ids:
        # a run that keeps nothing leaves the previous training set and its report as they were (a pair)
        failed = write_report(cfg.clean_dir, report, FAILED_REPORT)
        counts = "; ".join(f"{o['op']} removed {o['removed']}" for o in ops)
        kept = (f"the previous training set {cfg.train_dir} is kept as it was" if cfg.train_dir.exists()
                else "no training set was written")
        raise FilterError(
            f"nothing left after filtering {report['input']} images ({counts}; {len(skipped)} unreadable): "
            f"relax the recipe {recipe_path} or import more images; {kept} (this run's report: {failed})"
        )
    # the training folder first: a write that fails (full disk) then leaves the previous report and set as a pair
    train_dir = write_train_dir(cfg, [by_id[i] for i in kept_ids])
    report_path = write_report(cfg.clean_dir, report)
    cfg.clean_dir.joinpath(FAILED_REPORT).unlink(missing_ok=True)
    return FilterResult(train_dir=train_dir, kept=len(kept_ids), removed=removed, ops=ops,
                        report_path=report_path, executor=executor, input=report["input"],
                        skipped=skipped, raw_dir=cfg.raw_dir, images=images)


def show_removed(result: FilterResult, cols: int = 6, thumb: int = 160) -> Figure:
    """Thumbnail grid of the removed images, titled with the op and the value that removed them."""
    from kolors_lib.core.images import image_grid

    raw_dir = Path(result.raw_dir) if result.raw_dir else result.train_dir.parent.parent / "raw"
    rows = result.removed
    return image_grid([raw_dir / r["image"] for r in rows], [f"{r['id']} {r['op']}\n{r['value']}" for r in rows],
                      cols=cols, thumb=thumb, empty="nothing removed")
