"""Step 01: import a dataset (ModelScope, the generated sample set or a local folder) into raw/."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kolors_lib.core.config import Config
from kolors_lib.core.console import logged_step
from kolors_lib.core.console import progress as tqdm  # finished bars in saved notebooks
from kolors_lib.core.errors import DataError
from kolors_lib.core.files import staged_folder, write_json
from kolors_lib.core.images import ORIENTATION_TAG, to_rgb
from kolors_lib.core.lock import one_writer
from kolors_lib.data.sources import IMAGE_EXTS, METADATA_NAME, SourceItem, folder_items, is_inside, read_limited

if TYPE_CHECKING:
    import pandas as pd

REPORT_NAME = "import_report.json"
_COPY_FORMATS = {"JPEG": "jpg", "PNG": "png"}
_REQUIRED_KEYS = ("id", "images", "text")


class _Skip(Exception):
    """One input that cannot be imported; the message is the reason shown in the report."""


@dataclass
class ImportResult:
    """What step 01 wrote: raw_dir/images, raw_dir/metadata.jsonl and the skip/warning lists."""

    raw_dir: Path
    count: int
    skipped: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    source: str = ""

    @property
    def metadata_path(self) -> Path:
        """The metadata.jsonl that step 02 reads."""
        return self.raw_dir / METADATA_NAME

    @property
    def report_path(self) -> Path:
        """import_report.json: counts, skipped files and warnings."""
        return self.raw_dir / REPORT_NAME

    def image_paths(self) -> list[Path]:
        """Absolute paths of the imported images, in id order."""
        return [self.raw_dir / row["images"][0] for row in read_metadata(self.raw_dir)]

    def table(self) -> pd.DataFrame:
        """The imported rows (id, source, size, caption) as a DataFrame for the notebook."""
        import pandas as pd

        rows = [
            {"id": r["id"], "source": r.get("source", ""), "size": f"{r.get('width')}x{r.get('height')}",
             "caption": r["text"]}
            for r in read_metadata(self.raw_dir)
        ]
        return pd.DataFrame(rows, columns=["id", "source", "size", "caption"])

    def problems_table(self) -> pd.DataFrame:
        """Skipped files and warnings as one table: kind (skipped or warning), source, what."""
        import pandas as pd

        rows = [("skipped", s["source"], s["reason"]) for s in self.skipped]
        rows += [("warning", w["source"], w["message"]) for w in self.warnings]
        return pd.DataFrame(rows, columns=["kind", "source", "what"])

    def __str__(self) -> str:
        return (f"imported {self.count} image(s) into {self.raw_dir} "
                f"({len(self.skipped)} skipped, {len(self.warnings)} warning(s))")


# --------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _pil_guard(max_pixels: int) -> Iterator[None]:
    """Make PIL refuse truncated files and images above `max_pixels`, restoring its globals after."""
    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    # Data-Juicer sets LOAD_TRUNCATED_IMAGES=True at import; a half file must still be a skip here
    # PIL's own guard would refuse at 2x its limit with its own number in the message; _check_pixels
    # refuses from the header size instead, quoting data.max_pixels
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Skip an image whose header declares more pixels than allowed, before anything is decoded."""
    w, h = size
    if w <= 0 or h <= 0:
        raise _Skip(f"image header declares an empty size {w}x{h}")
    if w * h > max_pixels:
        raise _Skip(f"decompression-bomb guard: {w}x{h} = {w * h} pixels is above "
                    f"data.max_pixels={max_pixels}")


def _stored_8bit(img: Image.Image) -> bool:
    """Whether an opened, not yet loaded JPEG/PNG stores 8 bits per channel (PIL reads 16-bit PNG as RGB)."""
    if img.format == "PNG":
        return all(tile.args in ("RGB", ("RGB",)) for tile in img.tile)
    return True


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, bool]:
    """Open encoded bytes, check the declared size, then decode fully; returns (image, stored 8-bit)."""
    if not data:
        raise _Skip("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _Skip(f"decompression-bomb guard: {err}") from None
    except UnidentifiedImageError:
        raise _Skip("not a readable image (unknown or damaged format)") from None
    except Exception as err:  # PIL plugins raise many types (SyntaxError, struct.error, ...)
        raise _Skip(f"cannot read image header: {err}") from None
    _check_pixels(img.size, max_pixels)
    eight_bit = _stored_8bit(img)  # the tile list is gone after load()
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _Skip(f"decompression-bomb guard: {err}") from None
    except Exception as err:
        raise _Skip(f"cannot decode image (truncated or damaged): {err}") from None
    return img, eight_bit


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) of a decoded image."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block should not lose the image
        return 1
    # only 1..8 are orientations; anything else (99) is a broken tag that exif_transpose ignores too
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _import_one(item: SourceItem, dest_dir: Path, stem: str, max_pixels: int) -> tuple[str, int, int, list[str]]:
    """Write one image as images/<stem>.<ext>; returns (relative path, width, height, notes)."""
    data: bytes | None = None
    eight_bit = False
    if item.path is not None:
        try:
            data = read_limited(item.path)
        except OSError as err:  # a read problem skips this file; a write problem (full disk) stops the step
            raise _Skip(f"cannot read file: {err.strerror or err}") from None
        img, eight_bit = _open(data, max_pixels)
    elif isinstance(item.obj, (bytes, bytearray)):
        data = bytes(item.obj)
        img, eight_bit = _open(data, max_pixels)
    elif isinstance(item.obj, Image.Image):
        img = item.obj
        _check_pixels(img.size, max_pixels)
        try:
            img.load()
        except Exception as err:
            raise _Skip(f"cannot decode image (truncated or damaged): {err}") from None
    else:
        raise _Skip(f"row has no image (got {type(item.obj).__name__})")
    notes: list[str] = []
    orientation = _orientation(img)
    if getattr(img, "is_animated", False):
        notes.append("animated image: first frame used")
    copyable = (data is not None and eight_bit and img.format in _COPY_FORMATS and img.mode == "RGB"
                and "transparency" not in img.info and orientation == 1
                and not getattr(img, "is_animated", False))
    if copyable:
        # already what training wants: keep the exact bytes (no re-encoding loss)
        rel = f"images/{stem}.{_COPY_FORMATS[img.format]}"
        (dest_dir / rel).write_bytes(data)
        return rel, img.width, img.height, notes
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        notes.append(f"rotated upright (EXIF orientation {orientation})")
    try:
        rgb, note = to_rgb(img)
    except ValueError as err:
        raise _Skip(str(err)) from None
    if note:
        notes.append(note)
    rel = f"images/{stem}.png"
    rgb.save(dest_dir / rel, format="PNG")
    return rel, rgb.width, rgb.height, notes


# --------------------------------------------------------------------------- ModelScope


def _row_image(value: Any) -> Any:
    """A row's image as a PIL image, encoded bytes or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, Image.Image):
        name = getattr(value, "filename", "")
        return Path(name) if name and Path(name).is_file() else value
    if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
        return Path(value)
    return value


def _modelscope_items(cfg: Config, ds: Any) -> Iterator[SourceItem]:
    """Yield the dataset's rows as items named modelscope:<id>#<row>."""
    for index, row in enumerate(ds):
        source = f"modelscope:{cfg.data.dataset_id}#{index}"
        obj = _row_image(row.get("image") if isinstance(row, dict) else None)
        text = row.get("text") if isinstance(row, dict) else None
        caption = re.sub(r"\s+", " ", text).strip() if isinstance(text, str) else ""
        if isinstance(obj, Path):
            yield SourceItem(source=source, path=obj, caption=caption or None)
        else:
            yield SourceItem(source=source, obj=obj, caption=caption or None)


# --------------------------------------------------------------------------- the step


def _write_report(dest: Path, source: str, count: int, skipped: list[dict], warns: list[dict]) -> None:
    """Write import_report.json (no timestamps, so re-runs are byte-identical)."""
    write_json({"source": source, "imported": count, "skipped": skipped, "warnings": warns}, dest / REPORT_NAME)


def _import_rows(items: Iterable[SourceItem], cfg: Config, dest: Path, skipped: list[dict], warns: list[dict],
                 total: int | None) -> list[dict]:
    """Import each item into dest/images (up to data.limit); unreadable ones become skips."""
    limit = cfg.data.limit
    rows: list[dict] = []
    with _pil_guard(cfg.data.max_pixels):
        bar = tqdm(items, total=total, desc="import images", unit="img")
        for item in bar:
            if limit is not None and len(rows) >= limit:
                break
            stem = f"{len(rows) + 1:05d}"
            try:
                rel, width, height, notes = _import_one(item, dest, stem, cfg.data.max_pixels)
            except _Skip as why:
                skipped.append({"source": item.source, "reason": str(why)})
                continue
            warns.extend(item.notes)
            warns.extend({"source": item.source, "message": n} for n in notes)
            caption = item.caption if item.caption is not None else cfg.data.default_caption
            rows.append({"id": stem, "images": [rel], "text": caption, "source": item.source,
                         "width": width, "height": height})
        bar.close()
    return rows


def _run_import(items: Iterable[SourceItem], cfg: Config, source: str, skipped: list[dict],
                warns: list[dict], total: int | None) -> ImportResult:
    """Import `items` into a temporary folder beside raw_dir, then swap it in."""
    raw_dir = cfg.raw_dir
    limit = cfg.data.limit
    if limit is not None and limit < 1:
        raise DataError(f"data.limit must be at least 1 (or null for no limit), not {limit}")
    with staged_folder(raw_dir) as tmp:
        (tmp / "images").mkdir()
        rows = _import_rows(items, cfg, tmp, skipped, warns, total)
        if not rows:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:5])
            raise DataError(f"no image could be imported from {source}"
                            + (f" ({reasons})" if reasons else ""))
        with open(tmp / METADATA_NAME, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        _write_report(tmp, source, len(rows), skipped, warns)
    return ImportResult(raw_dir=raw_dir, count=len(rows), skipped=skipped, warnings=warns, source=source)


def _check_folder(root: Path, cfg: Config) -> Path:
    """Resolve a local source folder, refusing missing paths, files and overlaps with the output."""
    if not root.exists():
        raise DataError(f"source folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"source is not a folder: {root}")
    root = root.resolve()
    raw = cfg.raw_dir.resolve()
    # the output replaces raw_dir wholesale, so it must never hold (or sit inside) the source
    if is_inside(root, raw) or is_inside(raw, root):
        raise DataError(f"source folder {root} overlaps the output folder {raw}; "
                        "copy the images elsewhere first")
    return root


def import_folder(cfg: Config, folder: str | Path) -> ImportResult:
    """Import a local image folder (captions from same-named .txt files or a metadata.jsonl)."""
    root = _check_folder(Path(folder).expanduser(), cfg)
    skipped: list[dict] = []
    warns: list[dict] = []
    items = folder_items(root, skipped, warns)
    if not items:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in source folder {root}")
    return _run_import(items, cfg, str(root), skipped, warns, total=len(items))


def import_modelscope(cfg: Config) -> ImportResult:
    """Import cfg.data.dataset_id from ModelScope: its parquet files of cfg.data.split, downloaded and read."""
    from kolors_lib.data.hub_dataset import dataset_rows

    rows = dataset_rows(cfg)
    total = len(rows) if cfg.data.limit is None else min(len(rows), cfg.data.limit)
    # a file that turns out unreadable is reported as skipped, with the rows of the others imported
    return _run_import(_modelscope_items(cfg, rows), cfg, f"modelscope:{cfg.data.dataset_id}", rows.skipped, [],
                       total)


@logged_step("01_import")
@one_writer("import")
def import_dataset(cfg: Config, source: str | Path | None = None) -> ImportResult:
    """Step 01: import `source` (default cfg.data.source) into cfg.raw_dir: images/, metadata.jsonl."""
    source = cfg.data.source if source is None else source
    if isinstance(source, str) and source == "modelscope":
        return import_modelscope(cfg)
    if isinstance(source, str) and source == "sample":
        from kolors_lib.data.samples import make_sample_images

        folder = make_sample_images(cfg.workdir / "data" / "sample-source", cfg.seed)
        return import_folder(cfg, folder)
    if isinstance(source, str) and source == "toy":
        from kolors_lib.data.toy_world import make_ink_images

        return import_folder(cfg, make_ink_images(cfg.workdir / "data" / "toy-source", cfg.seed))
    return import_folder(cfg, source)


# --------------------------------------------------------------------------- reading back


def iter_metadata(raw_dir: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of raw_dir/metadata.jsonl, every line checked; errors name the file and line."""
    raw_dir = Path(raw_dir)
    path = raw_dir / METADATA_NAME
    if not path.is_file():
        raise DataError(f"{path} not found: run step 01 first (`python -m kolors_lib data import`)")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in _REQUIRED_KEYS if k not in row]
            if missing:
                raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
            images = row["images"]
            if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
                raise DataError(f"{where}: 'images' must be a non-empty list of paths")
            if not isinstance(row["text"], str):
                raise DataError(f"{where}: 'text' must be a string")
            for rel in images:
                # a path that leaves raw_dir would make later steps read (and copy) files they do not own
                if PurePosixPath(rel).is_absolute() or not is_inside(raw_dir / rel, raw_dir):
                    raise DataError(f"{where}: image path {rel!r} escapes {raw_dir}")
                if not (raw_dir / rel).is_file():
                    raise DataError(f"{where}: image file {rel!r} not found")
            yield lineno, row


def read_metadata(raw_dir: Path) -> list[dict]:
    """Read raw_dir/metadata.jsonl, checking every line; errors name the file and line."""
    return [row for _, row in iter_metadata(raw_dir)]


__all__ = ["ImportResult", "import_dataset", "import_folder", "import_modelscope", "iter_metadata", "read_metadata"]
