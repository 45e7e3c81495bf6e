"""Step 02's report: which recipe op removed each image, and the value that made it fail.

Data-Juicer's tracer (when it ran) says what each filter removed; otherwise the three image filters
are re-measured with PIL. Deduplicators are credited with what survived the filters but was not
kept, each removed copy named with the first copy that stayed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.clean.recipe import DEDUP_OPS, UNKNOWN_OP, RawItem, op_name, read_jsonl
from kolors_lib.core.errors import FilterError

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
    if op == "image_aesthetics_filter":
        from kolors_lib.clean.model_ops import describe_score

        return describe_score(stats)
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
        removed[op] = {str(row["id"]): row for row in read_jsonl(path) if "id" in row}
    for path in sorted(trace_dir.glob("duplicate-*.jsonl")):
        for pair in read_jsonl(path):
            for row in pair.values():
                if isinstance(row, dict) and row.get("__dj__imagehash"):
                    hashes[str(row["id"])] = row["__dj__imagehash"]
    return _Traces(removed, hashes)


class Attribution:
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
        # first copy -> the copy Ray's deduplicator kept instead (its row carries the caption)
        self.swapped: dict[str, str] = {}

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
                self.swapped[members[0]] = twin
            values.update({i: f"duplicate of {members[0]}" for i in members[1:]})
        return values

    def run(self, process: list[Any]) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
        """Kept ids (input order), per-op counts and removed rows."""
        ops = [op_name(entry) for entry in process]
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
