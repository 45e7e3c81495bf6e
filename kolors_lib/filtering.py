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

import contextlib
import csv
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kolors_lib.config import Config
from kolors_lib.console import logged_step
from kolors_lib.console import progress as tqdm  # finished bars in saved notebooks

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "FilterError",
    "FilterResult",
    "RawItem",
    "build_caption",
    "filter_dataset",
    "read_raw",
    "show_removed",
]

DEDUP_OPS = {"image_deduplicator": "ray_image_deduplicator"}
REMOVED_COLUMNS = ["id", "image", "source", "op", "value"]
UNKNOWN_OP = "unknown"
_CAPTION_SPLIT = re.compile(r"[,，]")


class FilterError(ValueError):
    """The raw dataset, the recipe or the Data-Juicer run cannot produce a training set."""


@dataclass
class RawItem:
    """One row of the raw `metadata.jsonl`, with its image resolved inside the raw folder."""

    id: str
    image: str
    path: Path
    text: str
    source: str
    line: int


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

    def table(self) -> pd.DataFrame:
        """Per-op counts, in recipe order."""
        import pandas as pd

        return pd.DataFrame(self.ops, columns=["op", "removed", "remaining"])

    def removed_table(self) -> pd.DataFrame:
        """One row per removed image, with the op that removed it and why."""
        import pandas as pd

        return pd.DataFrame(self.removed, columns=REMOVED_COLUMNS)


# ---------------------------------------------------------------- captions


def build_caption(text: str, trigger_word: str, add_tags: list[str], remove_tags: list[str]) -> str:
    """Kohya-style caption: comma tags, removals dropped, additions appended, trigger word first."""
    trigger = (trigger_word or "").strip()
    drop = {t.strip() for t in remove_tags if t.strip()}
    tags: list[str] = []
    for piece in [*_CAPTION_SPLIT.split(text or ""), *add_tags]:
        tag = piece.strip()
        # the trigger word is placed first below, so a copy inside the caption is dropped here
        if tag and tag not in drop and tag != trigger and tag not in tags:
            tags.append(tag)
    return ", ".join([trigger, *tags] if trigger else tags)


# ---------------------------------------------------------------- raw input


def read_raw(raw_dir: Path, default_caption: str = "") -> tuple[list[RawItem], list[dict[str, Any]]]:
    """Read step 01's `metadata.jsonl`; return the usable rows and the skipped (unreadable) ones."""
    from PIL import Image

    from kolors_lib.data import DataError, iter_metadata

    raw_dir = Path(raw_dir)
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


def _op_name(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        name, args = next(iter(entry.items()))
        return str(name), dict(args or {})
    raise FilterError(f"recipe: each 'process' entry must be a mapping with one op name, got {entry!r}")


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a Data-Juicer recipe YAML, with errors that name the file."""
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FilterError(f"Data-Juicer recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise FilterError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("process"), list) or not recipe["process"]:
        raise FilterError(f"{path}: a Data-Juicer recipe needs a non-empty 'process' list")
    for entry in recipe["process"]:
        _op_name(entry)
    return recipe


def resolve_recipe(
    recipe: dict[str, Any], dj_dir: Path, n: int, num_proc: int, executor: str
) -> dict[str, Any]:
    """Fill in the paths, process count and executor settings this step owns."""
    out = dict(recipe)
    run_dir = dj_dir / executor
    out.update(
        dataset_path=str(dj_dir / "input.jsonl"),
        work_dir=str(run_dir),
        np=int(num_proc),
        # attribution reads every removed row from the traces, so trace all of them
        open_tracer=True,
        trace_num=max(n, 1),
        # kept rows carry their image hash: dedup attribution needs no re-hashing
        keep_hashes_in_res_ds=True,
        # stats are cached by file fingerprint, which misses an image changed on disk
        use_cache=False,
    )
    if executor == "ray":
        out.update(executor_type="ray", ray_address=out.get("ray_address") or "local",
                   export_path=str(run_dir / "result"))
        # the default deduplicator refuses Ray mode; its Ray twin hashes the same way
        ops = map(_op_name, recipe["process"])
        out["process"] = [{DEDUP_OPS.get(name, name): args} for name, args in ops]
    else:
        out.update(executor_type="default", export_path=str(run_dir / "result.jsonl"))
    return out


@contextlib.contextmanager
def _no_runtime_installs() -> Iterator[None]:
    """Make Data-Juicer's lazy importer fail loudly instead of pip-installing a missing package."""
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]

    def refuse(cls: type, package_spec: str, pip_args: Any = None) -> None:
        raise FilterError(
            f"Data-Juicer tried to install {package_spec!r} at run time; install it in the venv "
            f"beforehand (see requirements.txt)"
        )

    LazyLoader._install_package = classmethod(refuse)
    try:
        yield
    finally:
        LazyLoader._install_package = original


@contextlib.contextmanager
def _dj_process_state() -> Iterator[None]:
    """Undo Data-Juicer's process-wide side effects: stdout/stderr redirection and RAY_JOB."""
    stdout, stderr = sys.stdout, sys.stderr
    ray_job = os.environ.get("RAY_JOB")
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        _reset_dj_logger()
        if ray_job is None:
            os.environ.pop("RAY_JOB", None)
        else:
            os.environ["RAY_JOB"] = ray_job


def _reset_dj_logger() -> None:
    """Close the log files Data-Juicer opened in its job folder; the next run opens its own.

    Data-Juicer sets up its logger once per process, so without this a second run would keep
    writing into the first run's (by then deleted) job folder.
    """
    from data_juicer.utils import logger_utils
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger_utils.LOGGER_SETUP = False


def _ray_worker_setup() -> None:
    """Run in every Ray worker: offline hubs and the CPU torchvision shim (imagededup needs it)."""
    from kolors_lib.compat import offline_hub_env, patch_torchvision

    offline_hub_env()
    patch_torchvision()


@contextlib.contextmanager
def _local_ray(address: str) -> Iterator[None]:
    """Start a local Ray whose workers get the environment fixes; shut it down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    prefixes = ("HF_", "TRANSFORMERS_", "_DJ_SPECIAL_TOKEN_")
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    env["RAY_JOB"] = "1"
    ray.init(
        address,
        runtime_env={"worker_process_setup_hook": "kolors_lib.filtering._ray_worker_setup", "env_vars": env},
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    """Data-Juicer's console log at WARNING and no `datasets` bars; its job-folder log files keep INFO.

    A learner's notebook otherwise fills with hundreds of lines of configuration tables and
    per-op progress bars; the per-op counts are shown as a table by step 02 instead.
    """
    import datasets
    from data_juicer.config import config as dj_config
    from loguru import logger

    add, display = logger.add, dj_config.display_config

    def console_at_warning(sink: Any, *args: Any, **kwargs: Any) -> int:
        if sink is sys.stderr or sink is sys.stdout:
            kwargs["level"] = "WARNING"
        return add(sink, *args, **kwargs)

    bars = datasets.is_progress_bar_enabled()
    logger.add = console_at_warning  # Data-Juicer adds its sinks inside init_configs
    dj_config.display_config = lambda cfg: None  # a ~300-line table; the recipe is saved in the job folder
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        del logger.add  # the instance attribute shadowed the method; this restores it
        dj_config.display_config = display
        if bars:
            datasets.enable_progress_bars()


def run_data_juicer(recipe_path: Path, executor: str, ray_address: str = "local") -> Path:
    """Run a resolved recipe with Data-Juicer's Python API; return the job folder (traces, logs)."""
    from kolors_lib.compat import offline_hub_env, patch_torchvision

    # HF datasets phones home on every jsonl load; imagededup imports torchvision
    offline_hub_env()
    patch_torchvision()
    # Ray must be up before init_configs, which already asks the cluster for its CPU count
    ray = _local_ray(ray_address) if executor == "ray" else contextlib.nullcontext()
    with _dj_process_state(), _no_runtime_installs(), _quiet_console(), ray:
        from data_juicer.config import init_configs

        dj_cfg = init_configs(args=["--config", str(recipe_path)])
        if executor == "ray":
            from data_juicer.core.executor.ray_executor import RayExecutor

            RayExecutor(dj_cfg).run()
        else:
            from data_juicer.core import DefaultExecutor

            DefaultExecutor(dj_cfg).run()
    return Path(dj_cfg.work_dir)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_export(export_path: Path) -> list[dict[str, Any]]:
    """Kept rows: one jsonl file (default executor) or a folder of jsonl shards (Ray)."""
    if export_path.is_dir():
        rows: list[dict[str, Any]] = []
        shards = sorted(p for p in export_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
        for shard in shards:
            rows.extend(_read_jsonl(shard))
        return rows
    if not export_path.is_file():
        raise FilterError(f"Data-Juicer wrote no result at {export_path}: logs in {export_path.parent}")
    return _read_jsonl(export_path)


# ---------------------------------------------------------------- attribution

_PIL_OPS = ("image_shape_filter", "image_aspect_ratio_filter", "image_size_filter")
_DEDUP_NAMES = {*DEDUP_OPS, *DEDUP_OPS.values()}


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def describe(op: str, stats: dict[str, Any]) -> str:
    """Human value of the stat an op filtered on, e.g. '1023x1024', 'ratio 2.05', 'size 12.3 KB'."""
    if op == "image_shape_filter" and "image_width" in stats:
        return f"{_first(stats['image_width'])}x{_first(stats['image_height'])}"
    if op == "image_aspect_ratio_filter" and "aspect_ratios" in stats:
        return f"ratio {float(_first(stats['aspect_ratios'])):.2f}"
    if op == "image_size_filter" and "image_sizes" in stats:
        return f"size {float(_first(stats['image_sizes'])) / 1024:.1f} KB"
    return ""


def _pil_stats(path: Path) -> dict[str, Any]:
    """The stats the three image filters compute, measured again with PIL."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return {"image_width": [w], "image_height": [h], "aspect_ratios": [w / h],
            "image_sizes": [path.stat().st_size]}


def _pil_fails(op: str, args: dict[str, Any], stats: dict[str, Any]) -> bool:
    """Whether one image fails one of the three image filters, by its recipe arguments."""
    from data_juicer.utils.mm_utils import size_to_bytes

    big = sys.maxsize
    if op == "image_shape_filter":
        w, h = _first(stats["image_width"]), _first(stats["image_height"])
        return not (args.get("min_width", 1) <= w <= args.get("max_width", big)
                    and args.get("min_height", 1) <= h <= args.get("max_height", big))
    if op == "image_aspect_ratio_filter":
        r = _first(stats["aspect_ratios"])
        return not (args.get("min_ratio", 0.333) <= r <= args.get("max_ratio", 3.0))
    low, high = size_to_bytes(str(args.get("min_size", "0"))), size_to_bytes(str(args.get("max_size", "1TB")))
    return not low <= _first(stats["image_sizes"]) <= high


def _image_hash(hasher: Any, path: Path) -> str:
    """The image hash exactly as Data-Juicer's deduplicator computes it."""
    import numpy as np
    from data_juicer.utils.mm_utils import load_image

    return hasher.encode_image(image_array=np.array(load_image(str(path))))


@dataclass
class _Traces:
    """What Data-Juicer's tracer wrote: removed rows per filter, image hashes from dedup pairs."""

    removed: dict[str, dict[str, dict[str, Any]]]
    hashes: dict[str, str]


def read_traces(job_dir: Path) -> _Traces | None:
    """Read `<job>/trace/`; None when no tracer ran (then filters are re-evaluated with PIL)."""
    trace_dir = job_dir / "trace"
    if not trace_dir.is_dir():
        return None
    removed: dict[str, dict[str, dict[str, Any]]] = {}
    hashes: dict[str, str] = {}
    for path in sorted(trace_dir.glob("sample_trace-*.jsonl")):
        op = path.stem.removeprefix("sample_trace-")
        # mapper traces carry only texts (no id): they removed nothing
        removed[op] = {str(row["id"]): row for row in _read_jsonl(path) if "id" in row}
    for path in sorted(trace_dir.glob("duplicate-*.jsonl")):
        for pair in _read_jsonl(path):
            for row in pair.values():
                if isinstance(row, dict) and row.get("__dj__imagehash"):
                    hashes[str(row["id"])] = row["__dj__imagehash"]
    return _Traces(removed, hashes)


class _Attribution:
    """Walk the recipe in order and name the op (and value) that removed each image."""

    def __init__(self, items: list[RawItem], kept_rows: list[dict[str, Any]], job_dir: Path) -> None:
        self.by_id = {it.id: it for it in items}
        self.order = {it.id: i for i, it in enumerate(items)}
        self.kept = {str(r["id"]) for r in kept_rows}
        unknown = sorted(self.kept - set(self.by_id))
        if unknown:
            raise FilterError(f"Data-Juicer returned ids not in its input: {', '.join(unknown[:5])}")
        self.traces = read_traces(job_dir)
        # kept rows carry the dedup hash (keep_hashes_in_res_ds), the dedup trace a few more
        self.hashes = {str(r["id"]): r["__dj__imagehash"] for r in kept_rows if r.get("__dj__imagehash")}
        if self.traces:
            self.hashes.update(self.traces.hashes)
        self._stats: dict[str, dict[str, Any]] = {}

    def stats(self, item_id: str) -> dict[str, Any]:
        """PIL-measured stats of one image (cached)."""
        if item_id not in self._stats:
            self._stats[item_id] = _pil_stats(self.by_id[item_id].path)
        return self._stats[item_id]

    def filter_removed(self, op: str, args: dict[str, Any], alive: list[str]) -> dict[str, str] | None:
        """id -> value for the alive rows a filter removed; None when that cannot be told."""
        if self.traces is not None:
            rows = self.traces.removed.get(op, {})
            return {i: describe(op, rows[i].get("__dj__stats__") or {}) for i in alive if i in rows}
        if op in _PIL_OPS:
            return {i: describe(op, self.stats(i)) for i in alive if _pil_fails(op, args, self.stats(i))}
        return None

    def dedup_removed(self, args: dict[str, Any], gone: list[str], alive: list[str]) -> dict[str, str]:
        """id -> 'duplicate of <id>' for the rows a deduplicator removed (keeps the first copy)."""
        hasher = None

        def image_hash(item_id: str) -> str:
            nonlocal hasher
            if item_id not in self.hashes:
                if hasher is None:
                    from data_juicer.ops.deduplicator.image_deduplicator import get_hash_method

                    hasher = get_hash_method(args.get("method", "phash"))()
                self.hashes[item_id] = _image_hash(hasher, self.by_id[item_id].path)
            return self.hashes[item_id]

        groups: dict[str, list[str]] = {}
        for i in gone:
            groups.setdefault(image_hash(i), []).append(i)
        twins: dict[str, str] = {}
        for i in (k for k in alive if k in self.kept):
            if len(twins) == len(groups):
                break
            h = image_hash(i)
            if h in groups and h not in twins:
                twins[h] = i
        values: dict[str, str] = {}
        for h, group in groups.items():
            twin = twins.get(h)
            if twin is None:
                values.update({i: "duplicate" for i in group})
                continue
            members = sorted([twin, *group], key=self.order.__getitem__)
            if members[0] != twin:
                # Ray dedups blocks in parallel, so any copy may win: keep the first, as the default does
                self.kept.discard(twin)
                self.kept.add(members[0])
            values.update({i: f"duplicate of {members[0]}" for i in members[1:]})
        return values

    def run(self, process: list[Any]) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
        """Kept ids (input order), per-op counts and removed rows."""
        ops = [_op_name(entry) for entry in process]
        alive = sorted(self.by_id, key=self.order.__getitem__)
        counts: list[dict[str, Any]] = []
        removed: list[dict[str, Any]] = []

        def record(op: str, gone: dict[str, str]) -> None:
            nonlocal alive
            alive = [i for i in alive if i not in gone]
            counts.append({"op": op, "removed": len(gone), "remaining": len(alive)})
            for i in sorted(gone, key=self.order.__getitem__):
                it = self.by_id[i]
                removed.append({"id": i, "image": it.image, "source": it.source, "op": op, "value": gone[i]})

        for index, (op, args) in enumerate(ops):
            if op in _DEDUP_NAMES:
                # a deduplicator removed what survived the filters, is not kept and no later filter took
                later: set[str] = set()
                for later_op, later_args in ops[index + 1:]:
                    if later_op not in _DEDUP_NAMES:
                        later |= set(self.filter_removed(later_op, later_args, alive) or {})
                gone = [i for i in alive if i not in self.kept and i not in later]
                record(op, self.dedup_removed(args, gone, alive))
                continue
            got = self.filter_removed(op, args, alive)
            if got is not None:
                record(op, got)
        # rows no op accounts for (an op we cannot judge): the counts must still add up
        rest = {i: "" for i in alive if i not in self.kept}
        if rest:
            record(UNKNOWN_OP, rest)
        return alive, counts, removed


# ---------------------------------------------------------------- outputs


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _swap_dir(new: Path, target: Path) -> None:
    """Put `new` in place of `target` with renames, so readers never see a half-written folder."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_train_dir(cfg: Config, kept: list[RawItem]) -> Path:
    """Copy the kept images and write `metadata.csv` into a fresh folder, then swap it in."""
    cfg.clean_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg.clean_dir / f".{cfg.train_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        names: set[str] = set()
        rows: list[list[Any]] = []
        for it in tqdm(kept, desc="copy kept images", leave=False):
            # ids are unique, file names only within one folder of raw_dir
            name = it.path.name if it.path.name not in names else f"{it.id}_{it.path.name}"
            names.add(name)
            shutil.copy2(it.path, tmp / name)
            f = cfg.filter
            rows.append([name, build_caption(it.text, f.trigger_word, f.add_tags, f.remove_tags)])
        csv_text = _csv_text(["file_name", "text"], rows)
        (tmp / "metadata.csv").write_text(csv_text, encoding="utf-8", newline="")
        _swap_dir(tmp, cfg.train_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfg.train_dir


def write_report(clean_dir: Path, report: dict[str, Any]) -> Path:
    """Write `report.json` and `removed.csv` (same rows) atomically."""
    clean_dir.mkdir(parents=True, exist_ok=True)
    rows = [[r[c] for c in REMOVED_COLUMNS] for r in report["removed"]]
    _atomic_write(clean_dir / "removed.csv", _csv_text(REMOVED_COLUMNS, rows))
    path = clean_dir / "report.json"
    _atomic_write(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------- the step


@logged_step("02_filter")
def filter_dataset(cfg: Config, recipe: Path | None = None, executor: str | None = None) -> FilterResult:
    """Step 02: run the Data-Juicer recipe on `cfg.raw_dir` and write the training folder and report."""
    executor = executor or cfg.filter.executor or "default"
    if executor not in ("default", "ray"):
        raise FilterError(f"executor must be 'default' or 'ray', not {executor!r}")
    items, skipped = read_raw(cfg.raw_dir, cfg.data.default_caption)
    recipe_path = Path(recipe or cfg.filter.recipe)
    recipe_data = load_recipe(recipe_path)

    # scratch space: stale job folders and traces would mislead the attribution
    dj_dir = cfg.clean_dir / "dj"
    if dj_dir.exists():
        shutil.rmtree(dj_dir)
    dj_dir.mkdir(parents=True)
    if items:
        with open(dj_dir / "input.jsonl", "w", encoding="utf-8") as fh:
            for it in items:
                # absolute paths: Data-Juicer resolves relative ones against its own guesses
                row = {"id": it.id, "images": [str(it.path)], "text": it.text, "source": it.source}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        resolved = resolve_recipe(recipe_data, dj_dir, len(items), cfg.filter.num_proc, executor)
        resolved_path = dj_dir / "recipe.yaml"
        text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
        resolved_path.write_text(text, encoding="utf-8")
        job_dir = run_data_juicer(resolved_path, executor, str(resolved.get("ray_address", "local")))
        kept_rows = read_export(Path(resolved["export_path"]))
        kept_ids, ops, removed = _Attribution(items, kept_rows, job_dir).run(recipe_data["process"])
    else:
        kept_ids, removed = [], []
        ops = [{"op": _op_name(e)[0], "removed": 0, "remaining": 0} for e in recipe_data["process"]]

    by_id = {it.id: it for it in items}
    report = {
        "input": len(items) + len(skipped),
        "kept": len(kept_ids),
        "executor": executor,
        "recipe": str(recipe_path),
        "ops": ops,
        "removed": removed,
        "skipped": skipped,
    }
    report_path = write_report(cfg.clean_dir, report)
    if not kept_ids:
        # a stale training set from an earlier run must not survive a run that keeps nothing
        if cfg.train_dir.exists():
            shutil.rmtree(cfg.train_dir)
        counts = "; ".join(f"{o['op']} removed {o['removed']}" for o in ops)
        raise FilterError(
            f"nothing left after filtering {report['input']} images ({counts}; {len(skipped)} unreadable): "
            f"relax the recipe {recipe_path} or import more images (report: {report_path})"
        )
    train_dir = write_train_dir(cfg, [by_id[i] for i in kept_ids])
    return FilterResult(train_dir=train_dir, kept=len(kept_ids), removed=removed, ops=ops,
                        report_path=report_path, executor=executor, input=report["input"],
                        skipped=skipped, raw_dir=cfg.raw_dir)


def show_removed(result: FilterResult, cols: int = 6, thumb: int = 160) -> Figure:
    """Thumbnail grid of the removed images, titled with the op and the value that removed them."""
    from matplotlib.figure import Figure
    from PIL import Image

    rows = result.removed
    ncols = max(1, min(cols, len(rows)))
    nrows = max(1, -(-len(rows) // ncols))
    inch = thumb / 100
    # a bare Figure (no pyplot): works under Agg and is not shown twice in a notebook
    fig = Figure(figsize=(ncols * inch, nrows * (inch + 0.45)), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not rows:
        axes[0][0].text(0.5, 0.5, "nothing removed", ha="center", va="center")
        return fig
    raw_dir = Path(result.raw_dir) if result.raw_dir else result.train_dir.parent.parent / "raw"
    for ax, row in zip(axes.flat, rows, strict=False):
        try:
            with Image.open(raw_dir / row["image"]) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                ax.imshow(im)
        except OSError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
        ax.set_title(f"{row['id']} {row['op']}\n{row['value']}", fontsize=7)
    fig.tight_layout()
    return fig
