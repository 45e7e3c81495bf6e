"""Step 01: importing the sample set, local folders and ModelScope (offline) into raw/."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import DataError
from kolors_lib.core.hub import hub_reachable
from kolors_lib.core.images import image_grid
from kolors_lib.data.importer import ImportResult, import_dataset, read_metadata
from kolors_lib.data.samples import MARK_RED, SAMPLE_EXPECTED, make_sample_images, phash
from kolors_lib.data.sources import decode_caption

Run = tuple[Config, ImportResult]
Rows = dict[str, dict]


def _tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (hidden ones too), by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _close(pixel: tuple[int, ...], want: tuple[int, ...], tol: int) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, want, strict=True))


def _png(path: Path, size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (10, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header declares width x height gray pixels (the data is a tiny stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _png_rgb16(path: Path, width: int = 8, height: int = 4) -> Path:
    """A 48-bit RGB PNG (PIL cannot write one): red channel at full 16-bit scale, the rest zero."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + struct.pack(">HHH", 65535, 0, 0) * width
    body = (chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The tiny profile's default step 01: generate the sample set and import it."""
    cfg = load_config(profile="tiny", workdir=tmp_path_factory.mktemp("sample") / "workdir")
    assert cfg.data.source == "sample"
    return cfg, import_dataset(cfg)


@pytest.fixture(scope="module")
def rows(sample_run: Run) -> Rows:
    """Imported metadata rows of the sample run, by source file name."""
    cfg, _ = sample_run
    return {row["source"]: row for row in read_metadata(cfg.raw_dir)}


def _open_row(cfg: Config, row: dict) -> Image.Image:
    img = Image.open(cfg.raw_dir / row["images"][0])
    img.load()
    return img


# --------------------------------------------------------------------------- the sample set


def test_sample_import_counts_and_skips(sample_run: Run) -> None:
    cfg, result = sample_run
    assert result.count == SAMPLE_EXPECTED["imported"] == 23
    assert result.raw_dir == cfg.raw_dir
    reasons = {s["source"]: s["reason"] for s in result.skipped}
    assert sorted(reasons) == sorted(SAMPLE_EXPECTED["skipped"])
    assert "empty file" in reasons["broken_empty.jpg"]
    assert "truncated" in reasons["broken_truncated.jpg"]
    assert "not a readable image" in reasons["broken_text.png"]
    assert "not an image file" in reasons["notes.md"]
    report = json.loads((cfg.raw_dir / "import_report.json").read_text(encoding="utf-8"))
    assert report["imported"] == 23
    assert report["skipped"] == result.skipped and report["warnings"] == result.warnings
    assert report["source"] == str(cfg.workdir / "data" / "sample-source")
    # captions are not images: they never show up as skips or rows
    lines = result.metadata_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 23
    assert [json.loads(line)["id"] for line in lines] == [f"{i:05d}" for i in range(1, 24)]


def test_sample_ids_follow_sorted_source_order(rows: Rows) -> None:
    ordered = sorted(rows.values(), key=lambda r: r["id"])
    assert [r["source"] for r in ordered] == sorted(rows)
    first = ordered[0]
    assert set(first) == {"id", "images", "text", "source", "width", "height"}
    assert first["images"] == [f"images/{first['id']}.jpg"]


def test_sample_files_cover_every_step02_filter(rows: Rows) -> None:
    for name in SAMPLE_EXPECTED["image_shape_filter"]:
        assert min(rows[name]["width"], rows[name]["height"]) < 1024
    for name in SAMPLE_EXPECTED["image_aspect_ratio_filter"]:
        ratio = rows[name]["width"] / rows[name]["height"]
        assert min(rows[name]["width"], rows[name]["height"]) >= 1024 and not 0.5 <= ratio <= 2.0
    removed = {n for key in ("image_shape_filter", "image_aspect_ratio_filter", "image_size_filter",
                             "image_deduplicator") for n in SAMPLE_EXPECTED[key]}
    survivors = [r for name, r in rows.items() if name not in removed]
    assert len(survivors) == SAMPLE_EXPECTED["kept"] == 15
    for row in survivors:
        assert min(row["width"], row["height"]) >= 1024 and 0.5 <= row["width"] / row["height"] <= 2.0
    boundary = {(r["width"], r["height"]) for r in survivors}
    assert {(1024, 1024), (2048, 1024), (1024, 2048)} <= boundary


def test_sample_file_sizes_match_size_filter(sample_run: Run, rows: Rows) -> None:
    cfg, _ = sample_run
    sizes = {name: (cfg.raw_dir / row["images"][0]).stat().st_size for name, row in rows.items()}
    assert sizes["blank_flat.png"] < 20 * 1024
    assert min(size for name, size in sizes.items() if name != "blank_flat.png") > 40 * 1024


def test_duplicates_in_sample(sample_run: Run, rows: Rows) -> None:
    cfg, _ = sample_run
    src = cfg.workdir / "data" / "sample-source"
    assert (src / "good_04.jpg").read_bytes() == (src / "good_04_copy.jpg").read_bytes()
    near = Image.open(src / "good_04_resaved.jpg")
    assert near.size != (1280, 1024) and near.size[0] >= 1024 and near.size[1] >= 1024
    # the kept copy sorts first, so the deduplicator drops the copies, not the original
    assert rows["good_04.jpg"]["id"] < rows["good_04_copy.jpg"]["id"] < rows["good_04_resaved.jpg"]["id"]


def test_every_image_is_8bit_rgb(sample_run: Run, rows: Rows) -> None:
    cfg, _ = sample_run
    files = sorted(p.name for p in (cfg.raw_dir / "images").iterdir())
    assert files == sorted(Path(r["images"][0]).name for r in rows.values())
    for row in rows.values():
        img = _open_row(cfg, row)
        assert img.mode == "RGB", row
        assert img.size == (row["width"], row["height"])
        assert img.getexif().get(0x0112, 1) == 1


def test_plain_files_copied_others_reencoded(sample_run: Run, rows: Rows) -> None:
    cfg, _ = sample_run
    src = cfg.workdir / "data" / "sample-source"
    for name in ("good_01_square.png", "good_04.jpg", "good_02_wide.jpg"):
        assert (cfg.raw_dir / rows[name]["images"][0]).read_bytes() == (src / name).read_bytes()
    for name in ("mode_cmyk.jpg", "mode_gray16.png", "mode_palette.png", "mode_rgba.png", "exif_rotated.jpg"):
        assert rows[name]["images"][0].endswith(".png")
        assert (cfg.raw_dir / rows[name]["images"][0]).read_bytes() != (src / name).read_bytes()


def test_exif_rotated_is_upright(sample_run: Run, rows: Rows) -> None:
    cfg, result = sample_run
    assert Image.open(cfg.workdir / "data" / "sample-source" / "exif_rotated.jpg").size == (1536, 1024)
    row = rows["exif_rotated.jpg"]
    assert (row["width"], row["height"]) == (1024, 1536)
    img = _open_row(cfg, row)
    assert img.size == (1024, 1536)
    # the marker was painted top-left on the upright picture
    assert _close(img.getpixel((40, 40)), MARK_RED, 20)
    assert not _close(img.getpixel((40, 1536 - 40)), MARK_RED, 20)
    assert not _close(img.getpixel((1024 - 40, 40)), MARK_RED, 20)
    rotated = {"source": "exif_rotated.jpg", "message": "rotated upright (EXIF orientation 6)"}
    assert rotated in result.warnings


def test_odd_modes_converted(sample_run: Run, rows: Rows) -> None:
    cfg, result = sample_run
    src = cfg.workdir / "data" / "sample-source"
    assert {n: Image.open(src / n).mode for n in ("mode_cmyk.jpg", "mode_gray16.png", "mode_palette.png",
                                                    "mode_rgba.png")} == {
        "mode_cmyk.jpg": "CMYK", "mode_gray16.png": "I;16", "mode_palette.png": "P", "mode_rgba.png": "RGBA"}
    assert _close(_open_row(cfg, rows["mode_cmyk.jpg"]).getpixel((40, 40)), MARK_RED, 25)
    assert _close(_open_row(cfg, rows["mode_palette.png"]).getpixel((40, 40)), MARK_RED, 25)

    gray = _open_row(cfg, rows["mode_gray16.png"])
    assert gray.getpixel((40, 40)) == (255, 255, 255)  # 65535 → 255
    assert _close(gray.getpixel((200, 40)), (128, 128, 128), 1)  # 128*257 → 128, not clipped to 255
    arr = np.asarray(gray)[400:, :, 0].astype(float)
    # the 16-bit ramp stays a ramp: dark on the left, bright on the right, mid-grey in the middle
    assert arr[:, :32].mean() < 30 and arr[:, -32:].mean() > 225 and 100 < arr[:, 496:528].mean() < 156

    rgba = _open_row(cfg, rows["mode_rgba.png"])
    assert rgba.getpixel((40, 40)) == (255, 255, 255)  # fully transparent (black underneath) → white
    assert _close(rgba.getpixel((40, 200)), (255, 128, 128), 2)  # red at alpha 128 over white

    notes = {w["source"]: w["message"] for w in result.warnings}
    assert notes["mode_cmyk.jpg"] == "converted from CMYK"
    assert "16-bit" in notes["mode_gray16.png"]
    assert "transparency" in notes["mode_rgba.png"]


def test_captions(sample_run: Run, rows: Rows) -> None:
    cfg, result = sample_run
    default = cfg.data.default_caption
    assert default  # the course's default caption ("二次元") is set in configs/default.yaml
    assert rows["good_01_square.png"]["text"] == "一个女孩，水墨画"
    assert rows["good_04.jpg"]["text"] == "古风少女站在桥上，工笔画"  # GBK file
    assert rows["good_05.png"]["text"] == "樱花树下的少女，水彩"  # BOM and whitespace stripped
    assert rows["good_03_tall.jpg"]["text"] == default  # empty .txt
    assert rows["good_06.jpg"]["text"] == default  # no .txt
    notes = {w["source"]: w["message"] for w in result.warnings}
    assert notes["good_04.txt"] == "caption is not UTF-8; decoded as GB18030"
    assert notes["good_03_tall.txt"] == "caption file empty, default caption used"
    assert "good_01_square.txt" not in notes and "good_05.txt" not in notes
    # Chinese stays readable in the file (ensure_ascii=False)
    assert "一个女孩，水墨画" in result.metadata_path.read_text(encoding="utf-8")


def test_decode_caption_rules() -> None:
    assert decode_caption("  水墨画\n".encode()) == ("水墨画", None)
    assert decode_caption("\ufeff水墨画".encode()) == ("水墨画", None)
    assert decode_caption("第一行\r\n第二行".encode()) == ("第一行 第二行", None)
    assert decode_caption("工笔画".encode("gbk")) == ("工笔画", "caption is not UTF-8; decoded as GB18030")
    text, warning = decode_caption(b"\x80\xff\xfe\x00")
    assert text is None and "neither UTF-8 nor GB18030" in warning
    assert decode_caption(b"  \n ") == (None, "caption file empty, default caption used")


def test_table_and_image_paths(sample_run: Run) -> None:
    _, result = sample_run
    table = result.table()
    assert list(table.columns) == ["id", "source", "size", "caption"]
    assert len(table) == 23
    row = table.set_index("source").loc["exif_rotated.jpg"]
    assert row["size"] == "1024x1536" and row["caption"] == "竖幅人像，水墨画"
    paths = result.image_paths()
    assert len(paths) == 23 and all(p.is_file() for p in paths)


def test_problems_table_has_one_kind_of_row(sample_run: Run) -> None:
    _, result = sample_run
    assert result.skipped and result.warnings  # the sample set has both
    table = result.problems_table()
    assert list(table.columns) == ["kind", "source", "what"]
    assert not table.isna().any().any()  # one row shape: no NaN cells from mixing the two kinds
    assert table["kind"].value_counts().to_dict() == {"skipped": len(result.skipped), "warning": len(result.warnings)}
    assert set(table[table.kind == "skipped"].source) == {s["source"] for s in result.skipped}


def test_sample_folder_is_deterministic_and_reused(
    tmp_path: Path, sample_run: Run
) -> None:
    cfg, _ = sample_run
    made = cfg.workdir / "data" / "sample-source"
    again = make_sample_images(tmp_path / "again", seed=cfg.seed)
    assert _tree_hashes(again) == _tree_hashes(made)
    mtimes = {p: p.stat().st_mtime_ns for p in again.iterdir()}
    assert make_sample_images(again, seed=cfg.seed) == again
    assert {p: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes  # reused, not rewritten


def test_make_sample_images_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="refusing"):
        make_sample_images(tmp_path, seed=0)
    assert (tmp_path / "mine.txt").read_text(encoding="utf-8") == "keep me"


# --------------------------------------------------------------------------- guarantees


def test_source_untouched_and_rerun_identical(tiny_cfg: Config, sample_run: Run) -> None:
    src = sample_run[0].workdir / "data" / "sample-source"
    before = _tree_hashes(src)
    first = import_dataset(tiny_cfg, src)
    meta1 = first.metadata_path.read_bytes()
    report1 = (tiny_cfg.raw_dir / "import_report.json").read_bytes()
    files1 = sorted(p.name for p in (tiny_cfg.raw_dir / "images").iterdir())
    # stale output from an older run must disappear
    (tiny_cfg.raw_dir / "images" / "99999.png").write_bytes(b"stale")
    (tiny_cfg.raw_dir / "leftover.txt").write_text("stale", encoding="utf-8")
    second = import_dataset(tiny_cfg, src)
    assert second.metadata_path.read_bytes() == meta1
    assert (tiny_cfg.raw_dir / "import_report.json").read_bytes() == report1
    assert sorted(p.name for p in (tiny_cfg.raw_dir / "images").iterdir()) == files1
    assert not (tiny_cfg.raw_dir / "leftover.txt").exists()
    assert meta1 == sample_run[1].metadata_path.read_bytes()
    assert _tree_hashes(src) == before
    # no temporary or old folders are left beside raw/
    assert sorted(p.name for p in tiny_cfg.raw_dir.parent.iterdir()) == ["raw"]


def test_limit(tiny_cfg: Config, sample_run: Run) -> None:
    tiny_cfg.data.limit = 5
    result = import_dataset(tiny_cfg, sample_run[0].workdir / "data" / "sample-source")
    assert result.count == 5
    assert [r["id"] for r in read_metadata(tiny_cfg.raw_dir)] == ["00001", "00002", "00003", "00004", "00005"]
    assert len(list((tiny_cfg.raw_dir / "images").iterdir())) == 5


def test_truncated_skipped_even_if_pil_allows_truncation(
    tiny_cfg: Config, sample_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Data-Juicer turns this on at import time; step 01 must still refuse half files
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    sample = sample_run[0].workdir / "data" / "sample-source"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("broken_truncated.jpg", "good_06.jpg"):
        shutil.copyfile(sample / name, src / name)
    result = import_dataset(tiny_cfg, src)
    assert result.count == 1
    assert [s["source"] for s in result.skipped] == ["broken_truncated.jpg"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the step


def test_undecodable_caption_dropped(tiny_cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "a.png")
    (src / "a.txt").write_bytes(b"\x80\xff\xfe\x00")
    (src / "orphan.txt").write_text("没有图片", encoding="utf-8")
    result = import_dataset(tiny_cfg, src)
    assert read_metadata(tiny_cfg.raw_dir)[0]["text"] == tiny_cfg.data.default_caption
    notes = {w["source"]: w["message"] for w in result.warnings}
    assert "neither UTF-8 nor GB18030" in notes["a.txt"]
    assert "no image" in notes["orphan.txt"]


# --------------------------------------------------------------------------- metadata.jsonl sources


def test_folder_with_metadata_jsonl(tiny_cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "a.png", colour=(200, 10, 10))
    _png(src / "b.png", colour=(10, 200, 10))
    _png(src / "sub" / "c.png", colour=(10, 10, 200))
    _png(tmp_path / "x.png", colour=(1, 2, 3))  # outside the source folder: must never be imported
    (src / "b.txt").write_text("来自txt", encoding="utf-8")
    lines = [
        json.dumps({"file_name": "a.png", "text": "一只猫"}, ensure_ascii=False),
        json.dumps({"image": "sub/c.png", "text": "一只狗"}, ensure_ascii=False),
        json.dumps({"file_name": "../x.png", "text": "escape"}),
        json.dumps({"file_name": str(tmp_path / "x.png"), "text": "absolute"}),
        "{not json",
        json.dumps({"file_name": "missing.png", "text": "gone"}),
    ]
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = _tree_hashes(src)
    result = import_dataset(tiny_cfg, src)
    assert result.count == 3
    texts = {r["source"]: r["text"] for r in read_metadata(tiny_cfg.raw_dir)}
    assert texts == {"a.png": "一只猫", "b.png": "来自txt", "sub/c.png": "一只狗"}
    skipped = {s["source"]: s["reason"] for s in result.skipped}
    assert set(skipped) == {"metadata.jsonl:3", "metadata.jsonl:4", "metadata.jsonl:5", "metadata.jsonl:6"}
    assert "escapes" in skipped["metadata.jsonl:3"] and "'../x.png'" in skipped["metadata.jsonl:3"]
    assert "escapes" in skipped["metadata.jsonl:4"] and "line 4" in skipped["metadata.jsonl:4"]
    assert "not valid JSON" in skipped["metadata.jsonl:5"]
    assert "missing.png" in skipped["metadata.jsonl:6"]
    assert any(w["source"] == "b.png" and "not listed" in w["message"] for w in result.warnings)
    assert _tree_hashes(src) == before


# --------------------------------------------------------------------------- decompression bombs


def test_max_pixels_guard(tiny_cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _png(src / "big.png", (100, 100))
    _png(src / "small.png", (64, 64))
    tiny_cfg.data.max_pixels = 5000
    saved = Image.MAX_IMAGE_PIXELS
    result = import_dataset(tiny_cfg, src)
    assert [r["source"] for r in read_metadata(tiny_cfg.raw_dir)] == ["small.png"]
    assert [s["source"] for s in result.skipped] == ["big.png"]
    assert "decompression-bomb guard" in result.skipped[0]["reason"]
    assert Image.MAX_IMAGE_PIXELS == saved  # PIL's global limit is restored


def test_bomb_headers_skipped_before_decoding(tiny_cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _bomb_png(src / "huge.png", 30000, 30000)  # 900 M pixels: far above the 100 M limit
    _bomb_png(src / "large.png", 12000, 12000)  # 144 M pixels: above the limit, below twice it
    _png(src / "ok.png")
    assert Image.open(src / "ok.png").size == (64, 64)
    start = time.monotonic()
    result = import_dataset(tiny_cfg, src)
    assert time.monotonic() - start < 5
    assert result.count == 1
    reasons = {s["source"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"huge.png", "large.png"}
    assert all("decompression-bomb guard" in r for r in reasons.values())


# --------------------------------------------------------------------------- errors


def test_missing_and_bad_sources(tiny_cfg: Config, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="not found") as err:
        import_dataset(tiny_cfg, missing)
    assert str(missing) in str(err.value)
    afile = tmp_path / "file.jpg"
    afile.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder") as err:
        import_dataset(tiny_cfg, afile)
    assert str(afile) in str(err.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no images", encoding="utf-8")
    with pytest.raises(DataError, match="no image files") as err:
        import_dataset(tiny_cfg, empty)
    assert str(empty) in str(err.value)
    assert not tiny_cfg.raw_dir.exists()


def test_all_broken_keeps_previous_output(tiny_cfg: Config, tmp_path: Path) -> None:
    good = tmp_path / "good"
    _png(good / "a.png")
    import_dataset(tiny_cfg, good)
    meta = (tiny_cfg.raw_dir / "metadata.jsonl").read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"")
    (broken / "b.png").write_text("text", encoding="utf-8")
    with pytest.raises(DataError, match="no image could be imported") as err:
        import_dataset(tiny_cfg, broken)
    assert str(broken) in str(err.value)
    assert (tiny_cfg.raw_dir / "metadata.jsonl").read_bytes() == meta
    assert sorted(p.name for p in tiny_cfg.raw_dir.parent.iterdir()) == ["raw"]


def test_source_overlapping_output_refused(tiny_cfg: Config) -> None:
    _png(tiny_cfg.raw_dir / "images" / "a.png")
    with pytest.raises(DataError, match="overlaps"):
        import_dataset(tiny_cfg, tiny_cfg.raw_dir)
    with pytest.raises(DataError, match="overlaps"):
        import_dataset(tiny_cfg, tiny_cfg.workdir)
    assert (tiny_cfg.raw_dir / "images" / "a.png").is_file()


def test_modelscope_offline_fails_fast(tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    for key in ("MODELSCOPE_API_MAX_RETRIES", "MODELSCOPE_DOWNLOAD_MAX_RETRIES",
                "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS"):
        monkeypatch.delenv(key, raising=False)
    assert hub_reachable() is False
    tiny_cfg.data.source = "modelscope"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        import_dataset(tiny_cfg)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert tiny_cfg.data.dataset_id in message
    assert "python -m kolors_lib data import SRC" in message
    assert "Traceback" not in message and err.value.__suppress_context__


def _write_raw(raw: Path, lines: list[str]) -> Path:
    _png(raw / "images" / "00001.png")
    (raw / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return raw


def test_read_metadata_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps({"id": "00001", "images": ["images/00001.png"], "text": "猫"}, ensure_ascii=False)
    raw = _write_raw(tmp_path / "ok", [good, "", good])
    assert [r["text"] for r in read_metadata(raw)] == ["猫", "猫"]

    def row(images: object) -> str:
        return json.dumps({"id": "1", "images": images, "text": ""})

    cases = {
        "bad-json": ([good, "{oops"], r"metadata\.jsonl:2: not valid JSON"),
        "missing": ([good, good, '{"id": "2", "text": "x"}'], r"metadata\.jsonl:3: missing key.* images"),
        "escape": ([row(["../x.png"])], r"metadata\.jsonl:1: .*escapes"),
        "absolute": ([row(["/etc/hosts"])], r"metadata\.jsonl:1: .*escapes"),
        "gone": ([row(["images/nope.png"])], r"metadata\.jsonl:1: .*not found"),
        "not-list": ([row("images/00001.png")], r"metadata\.jsonl:1: 'images' must"),
    }
    for name, (lines, pattern) in cases.items():
        raw = _write_raw(tmp_path / name, lines)
        with pytest.raises(DataError, match=pattern) as err:
            read_metadata(raw)
        assert str(raw / "metadata.jsonl") in str(err.value), name
    with pytest.raises(DataError, match="run step 01"):
        read_metadata(tmp_path / "nothing")


def test_image_grid_of_files(tmp_path: Path) -> None:
    paths = [_png(tmp_path / f"{i}.png", (300, 200), (i * 40, 100, 200)) for i in range(5)]
    paths.append(tmp_path / "missing.png")
    fig = image_grid(paths, captions=[f"t{i}" for i in range(6)], cols=4, thumb=80)
    axes = fig.get_axes()
    assert len(axes) == 8  # 2 rows of 4
    assert [ax.get_title() for ax in axes[:6]] == [f"t{i}" for i in range(6)]
    assert len(axes[0].get_images()) == 1 and axes[0].get_images()[0].get_array().shape[:2] == (53, 80)
    assert not axes[5].get_images()  # unreadable file: a note, not an exception
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")
    assert image_grid([]).texts[0].get_text() == "no images"


def test_modelscope_rows_imported(tiny_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of a hub dataset's parquet file, served by the loopback hub: captions cleaned, encoded images kept as
    they are, transparent ones flattened, a row without an image skipped with its reason."""
    from hub_repos import DATASET_ID, parquet_bytes
    from ms_download_server import DownloadHub

    encoded = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(encoded, format="PNG")
    rgba = io.BytesIO()
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(rgba, format="PNG")
    rows = [{"image": {"bytes": rgba.getvalue(), "path": "a.png"}, "text": " 一个女孩 "},
            {"image": {"bytes": encoded.getvalue(), "path": "b.png"}, "text": None},
            {"image": None, "text": "x"}]
    with DownloadHub() as hub:
        hub.add_dataset(DATASET_ID, {"data/train-00000-of-00001.parquet": parquet_bytes(rows)})
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        tiny_cfg.data.source = "modelscope"
        result = import_dataset(tiny_cfg)
    assert result.count == 2
    got = read_metadata(tiny_cfg.raw_dir)
    prefix = f"modelscope:{tiny_cfg.data.dataset_id}#"
    assert [r["source"] for r in got] == [prefix + "0", prefix + "1"]
    assert [r["text"] for r in got] == ["一个女孩", tiny_cfg.data.default_caption]
    assert [(r["width"], r["height"]) for r in got] == [(32, 32), (40, 30)]
    assert _open_row(tiny_cfg, got[0]).getpixel((5, 5)) == (255, 255, 255)
    assert (tiny_cfg.raw_dir / got[1]["images"][0]).read_bytes() == encoded.getvalue()
    assert result.skipped == [{"source": prefix + "2", "reason": "row has no image (got NoneType)"}]
    assert json.loads(result.report_path.read_text(encoding="utf-8"))["source"] == prefix[:-1]


def test_sample_phashes(sample_run: Run, rows: Rows) -> None:
    cfg, _ = sample_run
    groups: dict[str, list[str]] = {}
    for name, row in rows.items():
        groups.setdefault(phash(_open_row(cfg, row)), []).append(name)
    dups = [sorted(g) for g in groups.values() if len(g) > 1]
    # only the planted duplicates share a hash, so the deduplicator removes exactly those
    assert dups == [["good_04.jpg", *SAMPLE_EXPECTED["image_deduplicator"]]]


def test_16bit_rgb_png_reencoded_as_8bit(tiny_cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    deep = _png_rgb16(src / "deep.png")
    assert Image.open(deep).mode == "RGB"  # PIL hides the 16 bits: the file must not be copied as is
    import_dataset(tiny_cfg, src)
    (row,) = read_metadata(tiny_cfg.raw_dir)
    out = tiny_cfg.raw_dir / row["images"][0]
    assert out.read_bytes() != deep.read_bytes()
    assert out.read_bytes()[24] == 8  # IHDR bit depth
    assert Image.open(out).getpixel((0, 0)) == (255, 0, 0)


def test_limit_must_be_positive(tiny_cfg: Config, tmp_path: Path) -> None:
    _png(tmp_path / "src" / "a.png")
    tiny_cfg.data.limit = 0
    with pytest.raises(DataError, match="data.limit"):
        import_dataset(tiny_cfg, tmp_path / "src")
    assert not tiny_cfg.raw_dir.parent.exists() or not any(tiny_cfg.raw_dir.parent.iterdir())
