"""Step 02: Data-Juicer cleaning, op attribution, captions and DiffSynth's training layout."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kolors_lib.clean.attribution import Attribution
from kolors_lib.clean.pipeline import build_caption, filter_dataset, load_recipe, read_raw, show_removed
from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import FilterError
from kolors_lib.kolors.models import ensure_tiny_models

TRIGGER = "kolorsstyle"

# id: (width, height, format, caption); "flat" is a near-blank image, "dup:<id>" a copy of <id>
SPECS: dict[str, tuple[Any, ...]] = {
    "00001": (1024, 1024, "jpg", "a girl, red hair, lowres"),
    "00002": (2048, 1024, "jpg", "wide street,night ,  neon"),
    "00003": (1023, 1024, "jpg", "too narrow"),
    "00004": (1024, 2100, "jpg", "too tall"),
    "00005": (2100, 1024, "jpg", "too wide"),
    "00006": ("flat", 1024, "jpg", "blank"),
    "00007": ("dup:00001", 1100, "jpg", "resized copy"),
    "00008": (1024, 2048, "jpg", "tall tower, anime"),
    "00009": (1200, 1100, "png", 'a "quoted" cat, sitting'),
    "00010": (500, 500, "jpg", "tiny"),
    "00011": ("dup:00001", 1024, "jpg", "re-encoded copy"),
    "00012": (1536, 1024, "jpg", "山水，水墨, lowres，kolorsstyle"),
}
KEPT = ["00001", "00002", "00008", "00009", "00012"]
OPS = [
    ("image_shape_filter", 2, 10),
    ("image_aspect_ratio_filter", 2, 8),
    ("image_size_filter", 1, 7),
    ("image_deduplicator", 2, 5),
    ("image_aesthetics_filter", 0, 5),  # the tiny profile's threshold keeps every image
    ("kolors_caption_mapper", 0, 5),
]
PIL_OPS = 4  # the ops above that attribution can re-evaluate without Data-Juicer's traces


def noisy_image(width: int, height: int, seed: int) -> Image.Image:
    """Colourful blocks (distinct perceptual hash per seed) plus noise (JPEGs well over 20 KB)."""
    rng = np.random.default_rng(seed)
    blocks = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height))
    noise = rng.integers(-24, 24, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(blocks, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def make_raw(raw_dir: Path, specs: dict[str, tuple[Any, ...]] = SPECS) -> None:
    """Write step 01's layout: images/<id>.<ext> and metadata.jsonl."""
    (raw_dir / "images").mkdir(parents=True)
    lines = []
    for seed, (item_id, (w, h, ext, caption)) in enumerate(specs.items()):
        if w == "flat":
            im = Image.new("RGB", (h, h), (200, 190, 170))
        elif str(w).startswith("dup:"):
            with Image.open(raw_dir / "images" / f"{w[4:]}.jpg") as src:
                im = src.convert("RGB").resize((h, h))
        else:
            im = noisy_image(w, h, seed)
        rel = f"images/{item_id}.{ext}"
        im.save(raw_dir / rel, **({"quality": 85} if ext == "jpg" else {}))
        row = {"id": item_id, "images": [rel], "text": caption, "source": f"orig_{item_id}.jpg",
               "width": im.width, "height": im.height}
        lines.append(json.dumps(row, ensure_ascii=False))
    (raw_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def configure(cfg: Config) -> Config:
    cfg.filter.trigger_word = TRIGGER
    cfg.filter.add_tags = ["anime"]
    cfg.filter.remove_tags = ["lowres"]
    cfg.filter.num_proc = 2
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One raw folder, filtered twice with the default executor (a stale file planted between runs)."""
    cfg = configure(load_config(profile="tiny", workdir=tmp_path_factory.mktemp("filtering") / "workdir"))
    make_raw(cfg.raw_dir)
    ensure_tiny_models(cfg)  # written once per work dir; not part of the timed run
    raw_before = tree_hashes(cfg.raw_dir)
    pip_calls: list[Any] = []
    real_check_call, real_run = subprocess.check_call, subprocess.run

    def spy(real):  # noqa: ANN001, ANN202 - test double
        def wrapper(cmd, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if "pip" in " ".join(map(str, cmd if isinstance(cmd, list | tuple) else [cmd])):
                pip_calls.append(cmd)
            return real(cmd, *args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "check_call", spy(real_check_call))
        mp.setattr(subprocess, "run", spy(real_run))
        start = time.perf_counter()
        result = filter_dataset(cfg)
        seconds = time.perf_counter() - start
    first = {name: (cfg.clean_dir / name).read_bytes() for name in ("report.json", "removed.csv")}
    first["metadata.csv"] = (cfg.train_dir / "metadata.csv").read_bytes()
    first_train = tree_hashes(cfg.train_dir)
    (cfg.train_dir / "stale.png").write_bytes(b"left over from an older run")
    again = filter_dataset(cfg)
    print(f"Data-Juicer run: {seconds:.1f} s")
    return {"cfg": cfg, "result": result, "again": again, "raw_before": raw_before, "first": first,
            "first_train": first_train, "pip_calls": pip_calls, "seconds": seconds}


# ---------------------------------------------------------------- captions


def test_build_caption_trigger_first_tags_added_and_removed() -> None:
    got = build_caption("a girl, red hair, lowres", TRIGGER, ["anime"], ["lowres"])
    assert got == "kolorsstyle, a girl, red hair, anime"


def test_build_caption_chinese_comma_and_duplicates() -> None:
    got = build_caption("山水，水墨, 山水 ，kolorsstyle,, ", TRIGGER, ["水墨", "anime"], [])
    assert got == "kolorsstyle, 山水, 水墨, anime"


def test_build_caption_without_trigger_or_text() -> None:
    assert build_caption("  a , b ,a", "", [], ["b"]) == "a"
    assert build_caption("", "", [], []) == ""
    assert build_caption("", TRIGGER, ["x"], []) == "kolorsstyle, x"


# ---------------------------------------------------------------- the shared run


def test_kept_set(run: dict[str, Any]) -> None:
    cfg, result = run["cfg"], run["result"]
    assert result.kept == len(KEPT)
    images = sorted(p.name for p in cfg.train_dir.iterdir() if p.name != "metadata.csv")
    expected = sorted(Path(f"{i}.{SPECS[i][2]}").name for i in KEPT)
    assert images == expected
    for name in images:  # byte-identical copies
        assert (cfg.train_dir / name).read_bytes() == (cfg.raw_dir / "images" / name).read_bytes()


def test_per_op_counts(run: dict[str, Any]) -> None:
    result = run["result"]
    assert [(o["op"], o["removed"], o["remaining"]) for o in result.ops] == OPS
    table = result.table()
    assert list(table.columns) == ["op", "removed", "remaining"]
    assert table["removed"].sum() == len(SPECS) - len(KEPT)


def test_removed_images_op_and_value(run: dict[str, Any]) -> None:
    cfg, result = run["cfg"], run["result"]
    flat_kb = (cfg.raw_dir / "images" / "00006.jpg").stat().st_size / 1024
    assert flat_kb < 20
    expected = {
        "00003": ("image_shape_filter", "1023x1024"),
        "00010": ("image_shape_filter", "500x500"),
        "00004": ("image_aspect_ratio_filter", "ratio 0.49"),
        "00005": ("image_aspect_ratio_filter", "ratio 2.05"),
        "00006": ("image_size_filter", f"size {flat_kb:.1f} KB"),
        "00007": ("image_deduplicator", "duplicate of 00001"),
        "00011": ("image_deduplicator", "duplicate of 00001"),
    }
    assert {r["id"]: (r["op"], r["value"]) for r in result.removed} == expected
    for row in result.removed:
        assert row["image"] == f"images/{row['id']}.jpg"
        assert row["source"] == f"orig_{row['id']}.jpg"
    table = result.removed_table()
    assert list(table.columns) == ["id", "image", "source", "op", "value", "aesthetic"]
    assert len(table) == len(expected)


def test_report_and_removed_csv(run: dict[str, Any]) -> None:
    cfg, result = run["cfg"], run["result"]
    report = json.loads((cfg.clean_dir / "report.json").read_text(encoding="utf-8"))
    assert result.report_path == cfg.clean_dir / "report.json"
    assert report["input"] == len(SPECS) and report["kept"] == len(KEPT)
    assert report["executor"] == "default" and report["skipped"] == []
    assert report["ops"] == result.ops and report["removed"] == result.removed
    with open(cfg.clean_dir / "removed.csv", encoding="utf-8", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{k: "" if v is None else str(v) for k, v in r.items()}
                                            for r in result.removed]
    dj = cfg.clean_dir / "dj"
    assert (dj / "input.jsonl").is_file() and (dj / "recipe.yaml").is_file()
    for line in (dj / "input.jsonl").read_text(encoding="utf-8").splitlines():
        assert Path(json.loads(line)["images"][0]).is_absolute()


def test_metadata_csv(run: dict[str, Any]) -> None:
    cfg = run["cfg"]
    text = (cfg.train_dir / "metadata.csv").read_text(encoding="utf-8")
    assert text.startswith("file_name,text\n")
    assert '"kolorsstyle, a girl, red hair, anime"' in text  # captions with commas are quoted
    with open(cfg.train_dir / "metadata.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file_name"] for r in rows] == [f"{i}.{SPECS[i][2]}" for i in KEPT]
    captions = {r["file_name"]: r["text"] for r in rows}
    assert captions == {
        "00001.jpg": "kolorsstyle, a girl, red hair, anime",
        "00002.jpg": "kolorsstyle, wide street, night, neon, anime",
        "00008.jpg": "kolorsstyle, tall tower, anime",
        "00009.png": 'kolorsstyle, a "quoted" cat, sitting, anime',
        "00012.jpg": "kolorsstyle, 山水, 水墨, anime",
    }


def test_raw_folder_unmodified(run: dict[str, Any]) -> None:
    assert tree_hashes(run["cfg"].raw_dir) == run["raw_before"]


def test_rerun_is_idempotent(run: dict[str, Any]) -> None:
    cfg, again = run["cfg"], run["again"]
    assert not (cfg.train_dir / "stale.png").exists()
    assert tree_hashes(cfg.train_dir) == run["first_train"]
    assert (cfg.train_dir / "metadata.csv").read_bytes() == run["first"]["metadata.csv"]
    for name in ("report.json", "removed.csv"):
        assert (cfg.clean_dir / name).read_bytes() == run["first"][name]
    assert again.ops == run["result"].ops and again.removed == run["result"].removed
    # no temporary folders left beside the outputs
    assert sorted(p.name for p in cfg.clean_dir.iterdir()) == ["dj", "removed.csv", "report.json", "train"]


def test_data_juicer_installs_nothing(run: dict[str, Any]) -> None:
    assert run["pip_calls"] == []
    assert run["seconds"] < 60
    # every run gets its own log in its job folder (here: the re-run's); none mentions installing
    logs = list((run["cfg"].clean_dir / "dj" / "default").glob("*/logs/**/*.txt.gz"))
    text = "".join(gzip.decompress(p.read_bytes()).decode("utf-8", "replace") for p in logs)
    assert "OP [image_deduplicator] Done" in text
    assert "installing" not in text.lower()


def test_attribution_without_traces_keeps_the_first_copy(run: dict[str, Any], tmp_path: Path) -> None:
    """No tracer output (PIL re-evaluation) and a Ray-style dedup that kept a later copy."""
    cfg = run["cfg"]
    items, _ = read_raw(cfg.raw_dir)
    kept_rows = [{"id": i} for i in ["00011", *KEPT[1:]]]
    recipe = load_recipe(cfg.filter.recipe)
    kept, ops, removed = Attribution(items, kept_rows, tmp_path).run(recipe["process"])
    assert kept == KEPT
    assert ops == run["result"].ops[:PIL_OPS]
    assert removed == [{k: v for k, v in r.items() if k != "aesthetic"} for r in run["result"].removed]


def test_show_removed(run: dict[str, Any]) -> None:
    fig = show_removed(run["result"], cols=4, thumb=64)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titled) == len(run["result"].removed)
    assert any("duplicate of 00001" in t for t in titled)
    fig.savefig(run["cfg"].workdir / "removed.png")  # renders under Agg


# ---------------------------------------------------------------- bad input


def test_missing_raw_dir_says_run_step_01(tiny_cfg: Config) -> None:
    with pytest.raises(FilterError, match="data import"):
        filter_dataset(tiny_cfg)


def _write_meta(cfg: Config, rows: list[Any]) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (cfg.raw_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _small_raw(cfg: Config) -> dict[str, Any]:
    (cfg.raw_dir / "images").mkdir(parents=True)
    noisy_image(64, 64, 0).save(cfg.raw_dir / "images" / "a.jpg")
    return {"id": "a", "images": ["images/a.jpg"], "text": "t", "source": "s"}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("{not json", r"metadata\.jsonl:2: not valid JSON"),
        ({"id": "b", "images": ["../outside.jpg"], "text": "t"}, r"metadata\.jsonl:2: .*escapes"),
        ({"id": "b", "images": ["/etc/hostname"], "text": "t"}, r"metadata\.jsonl:2: .*escapes"),
        ({"id": "b", "images": ["images/missing.jpg"], "text": "t"}, r"metadata\.jsonl:2: .*not found"),
        ({"id": "b", "text": "t"}, r"metadata\.jsonl:2: missing key\(s\) images"),
        ({"id": "a", "images": ["images/a.jpg"], "text": "t"}, r"metadata\.jsonl:2: id 'a' already used"),
    ],
)
def test_bad_metadata_names_file_and_line(tiny_cfg: Config, bad: Any, match: str) -> None:
    good = _small_raw(tiny_cfg)
    (tiny_cfg.raw_dir.parent / "outside.jpg").write_bytes(b"x")
    _write_meta(tiny_cfg, [good, bad])
    with pytest.raises(FilterError, match=match):
        filter_dataset(tiny_cfg)
    assert not tiny_cfg.clean_dir.exists()


def test_unreadable_image_is_skipped_and_reported(tiny_cfg: Config) -> None:
    good = _small_raw(tiny_cfg)
    (tiny_cfg.raw_dir / "images" / "b.jpg").write_bytes(b"not an image")
    _write_meta(tiny_cfg, [good, {"id": "b", "images": ["images/b.jpg"], "text": "t", "source": "s"}])
    items, skipped = read_raw(tiny_cfg.raw_dir)
    assert [it.id for it in items] == ["a"]
    assert [(s["id"], s["line"]) for s in skipped] == [("b", 2)]
    assert "unreadable" in skipped[0]["reason"]


def test_nothing_left_raises_with_counts(tiny_cfg: Config) -> None:
    make_raw(tiny_cfg.raw_dir, {k: SPECS[k] for k in ("00003", "00004", "00010")})
    with pytest.raises(FilterError, match=r"nothing left.*image_shape_filter removed 2.*"
                                          r"image_aspect_ratio_filter removed 1"):
        filter_dataset(tiny_cfg)
    report = json.loads((tiny_cfg.clean_dir / "report.failed.json").read_text(encoding="utf-8"))
    assert report["kept"] == 0 and len(report["removed"]) == 3
    assert not tiny_cfg.train_dir.exists() and not (tiny_cfg.clean_dir / "report.json").exists()


# ---------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_executor_keeps_the_same_set(run: dict[str, Any], tmp_path: Path) -> None:
    cfg = configure(load_config(profile="tiny", workdir=tmp_path / "workdir"))
    make_raw(cfg.raw_dir)
    start = time.perf_counter()
    result = filter_dataset(cfg, executor="ray")
    print(f"Ray run: {time.perf_counter() - start:.1f} s")
    assert result.executor == "ray"
    default = run["result"]
    names = sorted(p.name for p in result.train_dir.iterdir())
    assert names == sorted(p.name for p in default.train_dir.iterdir())
    metadata = (result.train_dir / "metadata.csv").read_bytes()
    assert metadata == (default.train_dir / "metadata.csv").read_bytes()
    # counts and attribution match the default executor's
    assert result.ops == default.ops
    assert result.removed == default.removed


def test_console_stays_short_while_job_logs_keep_info(tiny_cfg: Config, capfd: pytest.CaptureFixture[str]) -> None:
    make_raw(tiny_cfg.raw_dir, {k: SPECS[k] for k in ("00001", "00003", "00004")})
    filter_dataset(tiny_cfg)
    out, err = capfd.readouterr()
    console = (out + err).splitlines()
    assert len(console) < 40, "\n".join(console[:60])
    assert not any("Configuration table" in line or "│ key" in line for line in console)
    logs = list((tiny_cfg.clean_dir / "dj" / "default").glob("*/logs/**/*.txt.gz"))
    text = "".join(gzip.decompress(p.read_bytes()).decode("utf-8", "replace") for p in logs)
    assert "| INFO" in text and "OP [image_shape_filter] Done" in text


def test_processes_forked_for_data_juicer_run_torch_on_one_thread() -> None:
    """datasets forks its map workers even for num_proc=1; torch's inherited OpenMP pool must not be used."""
    import os

    import torch

    from kolors_lib.clean.dj_runtime import single_threaded_forks

    torch.set_num_threads(2)
    torch.ones(64, 64) @ torch.ones(64, 64)  # the parent's thread pool is up, as after a model op ran
    single_threaded_forks()
    single_threaded_forks()  # registering twice adds no second hook
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its thread count and leaves without running pytest's teardown
        os.write(write, str(torch.get_num_threads()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    assert os.read(read, 16) == b"1"
    assert torch.get_num_threads() == 2  # the parent keeps its threads
