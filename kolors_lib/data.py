"""Step 01: import a dataset (ModelScope, the generated sample set or a local folder) into raw/."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageOps, UnidentifiedImageError

from kolors_lib.config import Config
from kolors_lib.console import logged_step
from kolors_lib.console import progress as tqdm  # finished bars in saved notebooks
from kolors_lib.hub import hub_endpoint, hub_reachable
from kolors_lib.viz import font_properties

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
REPORT_NAME = "import_report.json"
# ModelScope reads these at import time; with them an unreachable hub fails at once, not after ~15 s.
OFFLINE_HUB_ENV = {
    "MODELSCOPE_API_MAX_RETRIES": "1",
    "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
    "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1",
}
_COPY_FORMATS = {"JPEG": "jpg", "PNG": "png"}
_ORIENTATION_TAG = 0x0112
_SAMPLE_VERSION = 1
_SAMPLE_MANIFEST = ".sample-manifest.json"
_REQUIRED_KEYS = ("id", "images", "text")


class DataError(ValueError):
    """A dataset source or metadata file that cannot be used."""


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


@dataclass
class _Item:
    """One image to import: a file on disk or a row's image object, plus its caption."""

    source: str
    path: Path | None = None
    obj: Any = None
    caption: str | None = None
    notes: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- captions


def decode_caption(raw: bytes) -> tuple[str | None, str | None]:
    """Decode caption bytes: UTF-8 (BOM allowed), else GB18030; returns (text or None, warning)."""
    warning = None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("gb18030")
            warning = "caption is not UTF-8; decoded as GB18030"
        except UnicodeDecodeError:
            return None, "caption is neither UTF-8 nor GB18030; default caption used"
    # one caption per image: line breaks inside a caption would break CSV-minded tools later
    text = re.sub(r"\s*[\r\n]+\s*", " ", text).strip()
    if not text:
        return None, warning or "caption file empty, default caption used"
    return text, warning


# --------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _pil_guard(max_pixels: int) -> Iterator[None]:
    """Make PIL refuse truncated files and images above `max_pixels`, restoring its globals after."""
    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    # Data-Juicer sets LOAD_TRUNCATED_IMAGES=True at import; a half file must still be a skip here
    Image.MAX_IMAGE_PIXELS = max_pixels
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


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns (image, note) where note says what changed."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if mode == "RGB" and not has_alpha:
        return img, None
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
            how = "float scaled to 8-bit"
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            # 65535 / 257 = 255 exactly: the full 16-bit range maps onto 0..255 instead of clipping
            arr = arr / 257.0
            how = "16-bit scaled to 8-bit"
        else:
            how = "32-bit integer, values already 0..255"
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB"), f"converted from {mode} ({how})"
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), \
            f"converted from {mode} (transparency composited on white)"
    try:
        return img.convert("RGB"), f"converted from {mode}"
    except (ValueError, OSError) as err:
        raise _Skip(f"unsupported colour mode {mode}: {err}") from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright) of a decoded image."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block should not lose the image
        return 1
    return value if isinstance(value, int) else 1


def _import_one(item: _Item, dest_dir: Path, stem: str, max_pixels: int) -> tuple[str, int, int, list[str]]:
    """Write one image as images/<stem>.<ext>; returns (relative path, width, height, notes)."""
    data: bytes | None = None
    eight_bit = False
    if item.path is not None:
        data = item.path.read_bytes()
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
    rgb, note = to_rgb(img)
    if note:
        notes.append(note)
    rel = f"images/{stem}.png"
    rgb.save(dest_dir / rel, format="PNG")
    return rel, rgb.width, rgb.height, notes


# --------------------------------------------------------------------------- local folders


def _inside(path: Path, root: Path) -> bool:
    """True when `path` is `root` or below it (both resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _walk(root: Path) -> list[str]:
    """Every non-hidden file below `root`, as sorted relative POSIX paths (symlinked dirs not followed)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        found.extend((base / f).relative_to(root).as_posix() for f in filenames if not f.startswith("."))
    return sorted(found)


def _metadata_entry_name(entry: Any) -> Any:
    """The image path of one metadata.jsonl entry (`file_name`, `image` or a one-item `images`)."""
    if not isinstance(entry, dict):
        return None
    for key in ("file_name", "image"):
        if key in entry:
            return entry[key]
    images = entry.get("images")
    if isinstance(images, list) and len(images) == 1:
        return images[0]
    return None


def _read_source_metadata(
    root: Path, skipped: list[dict], warns: list[dict]
) -> dict[str, tuple[int, Any]]:
    """Parse root/metadata.jsonl into {relative image path: (line number, text)}; bad lines are skips."""
    out: dict[str, tuple[int, Any]] = {}
    lines = (root / METADATA_NAME).read_bytes().decode("utf-8-sig", errors="replace").splitlines()
    for lineno, line in enumerate(lines, 1):
        where = f"{METADATA_NAME}:{lineno}"
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.append({"source": where, "reason": f"line {lineno} is not valid JSON: {err.msg}"})
            continue
        name = _metadata_entry_name(entry)
        if not isinstance(name, str) or not name.strip():
            skipped.append({"source": where,
                            "reason": f"line {lineno} has no image path (file_name, image or images)"})
            continue
        rel = PurePosixPath(name.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", name) \
                or not _inside(root / rel, root):
            skipped.append({"source": where,
                            "reason": f"line {lineno}: path {name!r} escapes the source folder"})
            continue
        key = rel.as_posix()
        if key in out:
            warns.append({"source": where,
                          "message": f"line {lineno} repeats {key!r} (first at line {out[key][0]}); ignored"})
            continue
        out[key] = (lineno, entry.get("text"))
    return out


def _caption_for(root: Path, rel: str, captions: dict[str, str], listed: dict[str, tuple[int, Any]] | None,
                 ) -> tuple[str | None, list[dict]]:
    """The caption of image `rel`: metadata.jsonl text, else same-named .txt, else None (default)."""
    if listed is not None and rel in listed:
        lineno, text = listed[rel]
        where = f"{METADATA_NAME}:{lineno}"
        if not isinstance(text, str):
            return None, [{"source": where, "message": "no text for this image, default caption used"}]
        text = re.sub(r"\s*[\r\n]+\s*", " ", text).strip()
        if not text:
            return None, [{"source": where, "message": "caption empty, default caption used"}]
        return text, []
    notes = []
    if listed is not None:
        notes.append({"source": rel, "message": f"not listed in {METADATA_NAME}; imported anyway"})
    txt = captions.get(str(PurePosixPath(rel).with_suffix("")))
    if txt is None:
        return None, notes
    text, warning = decode_caption((root / txt).read_bytes())
    if warning:
        notes.append({"source": txt, "message": warning})
    return text, notes


def _folder_items(root: Path, skipped: list[dict], warns: list[dict]) -> list[_Item]:
    """List a local folder's images with their captions; non-images and bad metadata lines are skips."""
    files = _walk(root)
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_EXTS]
    captions = {str(PurePosixPath(f).with_suffix("")): f
                for f in files if PurePosixPath(f).suffix.lower() == ".txt"}
    listed = _read_source_metadata(root, skipped, warns) if METADATA_NAME in files else None
    if listed is not None:
        for key, (lineno, _text) in listed.items():
            if key not in images:
                skipped.append({"source": f"{METADATA_NAME}:{lineno}",
                                "reason": f"line {lineno}: {key!r} is not an image in the source folder"})
    stems = {str(PurePosixPath(f).with_suffix("")) for f in images}
    for f in files:
        suffix = PurePosixPath(f).suffix.lower()
        if f == METADATA_NAME or suffix in IMAGE_EXTS:
            continue
        if suffix == ".txt":
            if str(PurePosixPath(f).with_suffix("")) not in stems:
                warns.append({"source": f, "message": "caption file has no image of the same name; ignored"})
            continue
        skipped.append({"source": f, "reason": f"not an image file ({suffix or 'no extension'})"})
    items = []
    for rel in images:
        caption, notes = _caption_for(root, rel, captions, listed)
        items.append(_Item(source=rel, path=root / rel, caption=caption, notes=notes))
    return items


# --------------------------------------------------------------------------- ModelScope


def _hub_error(cfg: Config, err: BaseException, offline: bool) -> DataError:
    """A short DataError for a failed ModelScope load, pointing at the local-folder route."""
    detail = " ".join(f"{type(err).__name__}: {err}".split())
    detail = detail if len(detail) <= 300 else detail[:299] + "…"
    why = f"the hub {hub_endpoint()} is unreachable" if offline else detail
    extra = f" ({detail})" if offline else ""
    return DataError(
        f"could not load ModelScope dataset {cfg.data.dataset_id!r}: {why}{extra}. "
        "Pass a local image folder instead: `python -m kolors_lib data import SRC` "
        "(or set data.source to a folder, or 'sample', in the config)."
    )


def _modelscope_dataset(cfg: Config) -> Any:
    """Load cfg.data.dataset_id like the camp did; any failure becomes a DataError."""
    offline = not hub_reachable()
    cache = cfg.workdir / "data" / "modelscope"
    if offline:
        if not any(cache.glob("*")):
            # nothing cached to fall back on: say so now rather than after MsDataset's retries
            raise _hub_error(cfg, ConnectionError("no network route to the hub"), offline) from None
        for key, value in OFFLINE_HUB_ENV.items():
            os.environ.setdefault(key, value)
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError as err:
        raise DataError(f"modelscope is not installed ({err}); install requirements.txt "
                        "or pass a local folder: `python -m kolors_lib data import SRC`") from None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return MsDataset.load(cfg.data.dataset_id, subset_name=cfg.data.subset, split=cfg.data.split,
                              cache_dir=str(cache))
    except Exception as err:
        raise _hub_error(cfg, err, offline) from None


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


def _modelscope_items(cfg: Config, ds: Any) -> Iterator[_Item]:
    """Yield the dataset's rows as items named modelscope:<id>#<row>."""
    for index, row in enumerate(ds):
        source = f"modelscope:{cfg.data.dataset_id}#{index}"
        obj = _row_image(row.get("image") if isinstance(row, dict) else None)
        text = row.get("text") if isinstance(row, dict) else None
        caption = re.sub(r"\s+", " ", text).strip() if isinstance(text, str) else ""
        if isinstance(obj, Path):
            yield _Item(source=source, path=obj, caption=caption or None)
        else:
            yield _Item(source=source, obj=obj, caption=caption or None)


# --------------------------------------------------------------------------- the step


def _write_report(dest: Path, source: str, count: int, skipped: list[dict], warns: list[dict]) -> None:
    """Write import_report.json (no timestamps, so re-runs are byte-identical)."""
    report = {"source": source, "imported": count, "skipped": skipped, "warnings": warns}
    (dest / REPORT_NAME).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace `dest` with the finished `tmp` folder (two renames; no half-written dest is ever seen)."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _run_import(items: Iterable[_Item], cfg: Config, source: str, skipped: list[dict],
                warns: list[dict], total: int | None) -> ImportResult:
    """Import `items` into a temporary folder beside raw_dir, then swap it in."""
    raw_dir = cfg.raw_dir
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    limit = cfg.data.limit
    if limit is not None and limit < 1:
        raise DataError(f"data.limit must be at least 1 (or null for no limit), not {limit}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}-import-", dir=raw_dir.parent))
    try:
        (tmp / "images").mkdir()
        rows: list[dict] = []
        with _pil_guard(cfg.data.max_pixels):
            bar = tqdm(items, total=total, desc="import images", unit="img")
            for item in bar:
                if limit is not None and len(rows) >= limit:
                    break
                stem = f"{len(rows) + 1:05d}"
                try:
                    rel, width, height, notes = _import_one(item, tmp, stem, cfg.data.max_pixels)
                except _Skip as why:
                    skipped.append({"source": item.source, "reason": str(why)})
                    continue
                except OSError as err:
                    skipped.append({"source": item.source, "reason": f"cannot read file: {err}"})
                    continue
                warns.extend(item.notes)
                warns.extend({"source": item.source, "message": n} for n in notes)
                caption = item.caption if item.caption is not None else cfg.data.default_caption
                rows.append({"id": stem, "images": [rel], "text": caption, "source": item.source,
                             "width": width, "height": height})
            bar.close()
        if not rows:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in skipped[:5])
            raise DataError(f"no image could be imported from {source}"
                            + (f" ({reasons})" if reasons else ""))
        with open(tmp / METADATA_NAME, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        _write_report(tmp, source, len(rows), skipped, warns)
        _swap_in(tmp, raw_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    if _inside(root, raw) or _inside(raw, root):
        raise DataError(f"source folder {root} overlaps the output folder {raw}; "
                        "copy the images elsewhere first")
    return root


def import_folder(cfg: Config, folder: str | Path) -> ImportResult:
    """Import a local image folder (captions from same-named .txt files or a metadata.jsonl)."""
    root = _check_folder(Path(folder).expanduser(), cfg)
    skipped: list[dict] = []
    warns: list[dict] = []
    items = _folder_items(root, skipped, warns)
    if not items:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in source folder {root}")
    return _run_import(items, cfg, str(root), skipped, warns, total=len(items))


def import_modelscope(cfg: Config) -> ImportResult:
    """Import cfg.data.dataset_id from ModelScope (the camp's MsDataset.load call)."""
    ds = _modelscope_dataset(cfg)
    try:
        total = len(ds)
    except Exception:
        total = None
    if cfg.data.limit is not None and total is not None:
        total = min(total, cfg.data.limit)
    try:
        items = _modelscope_items(cfg, ds)
        return _run_import(items, cfg, f"modelscope:{cfg.data.dataset_id}", [], [], total)
    except DataError:
        raise
    except Exception as err:  # rows are fetched lazily: a network failure can surface mid-iteration
        raise _hub_error(cfg, err, offline=False) from None


@logged_step("01_import")
def import_dataset(cfg: Config, source: str | Path | None = None) -> ImportResult:
    """Step 01: import `source` (default cfg.data.source) into cfg.raw_dir: images/, metadata.jsonl."""
    source = cfg.data.source if source is None else source
    if isinstance(source, str) and source == "modelscope":
        return import_modelscope(cfg)
    if isinstance(source, str) and source == "sample":
        folder = make_sample_images(cfg.workdir / "data" / "sample-source", cfg.seed)
        return import_folder(cfg, folder)
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
                if PurePosixPath(rel).is_absolute() or not _inside(raw_dir / rel, raw_dir):
                    raise DataError(f"{where}: image path {rel!r} escapes {raw_dir}")
                if not (raw_dir / rel).is_file():
                    raise DataError(f"{where}: image file {rel!r} not found")
            yield lineno, row


def read_metadata(raw_dir: Path) -> list[dict]:
    """Read raw_dir/metadata.jsonl, checking every line; errors name the file and line."""
    return [row for _, row in iter_metadata(raw_dir)]


def show_images(
    paths: list[Path], titles: list[str] | None = None, cols: int = 6, thumb: int = 160
) -> Figure:
    """A thumbnail grid of `paths` as a matplotlib Figure (no pyplot, so it works headless)."""
    from matplotlib.figure import Figure

    paths = [Path(p) for p in paths]
    cols = max(1, min(cols, len(paths) or 1))
    rows = max(1, -(-len(paths) // cols))
    inch = thumb / 100
    fig = Figure(figsize=(cols * inch, rows * (inch + 0.3)), dpi=100)
    if not paths:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
        return fig
    axes = fig.subplots(rows, cols, squeeze=False)
    font = font_properties("".join(titles or []))
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= len(paths):
            continue
        title = titles[index] if titles and index < len(titles) else paths[index].name
        try:
            with Image.open(paths[index]) as img:
                img = ImageOps.exif_transpose(img)
                img.thumbnail((thumb, thumb))
                ax.imshow(np.asarray(to_rgb(img)[0]))
        except Exception as err:  # one unreadable file should not hide the rest of the grid
            ax.text(0.5, 0.5, f"unreadable\n{type(err).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(title if len(title) <= 24 else title[:23] + "…", fontsize=7, fontproperties=font)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the sample set


def _art(rng: np.random.Generator, width: int, height: int, noise: int = 10) -> Image.Image:
    """A colourful random picture: gradient, shapes and grain (grain keeps JPEGs well above 20 KB)."""
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    scale = min(width, height)
    for _ in range(int(rng.integers(14, 24))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(scale // 12, scale // 2)), int(rng.integers(scale // 12, scale // 2))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 2:
            pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=int(rng.integers(4, 24)))
    if noise:
        arr = np.asarray(img).astype(np.int16) + rng.integers(-noise, noise + 1, (height, width, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img


# colours of the marker squares the tests read back after conversion
MARK_RED = (230, 20, 20)
MARK_SEMI = (255, 0, 0)  # drawn at alpha 128 in the RGBA sample: composited on white → (255, 128, 128)

# name, width, height: the plain good images (all pass every step-02 filter)
_GOOD = (
    ("good_01_square.png", 1024, 1024),  # boundary: exactly the minimum size
    ("good_02_wide.jpg", 2048, 1024),    # boundary: ratio 2.0
    ("good_03_tall.jpg", 1024, 2048),    # boundary: ratio 0.5
    ("good_04.jpg", 1280, 1024),
    ("good_05.png", 1024, 1280),
    ("good_06.jpg", 1536, 1152),
    ("good_07.jpg", 1200, 1600),
    ("good_08.png", 1100, 1100),
    ("good_09.jpg", 1920, 1080),
    ("good_10.jpg", 1024, 1536),
)
# images that import fine but a step-02 filter removes
_TOO_SMALL = (("small_512.jpg", 512, 512), ("small_1023x1024.png", 1023, 1024),
              ("small_800x1200.jpg", 800, 1200))
_BAD_ASPECT = (("aspect_tall_1024x2100.jpg", 1024, 2100), ("aspect_wide_3100x1024.jpg", 3100, 1024))

# what each step-02 filter should remove from the imported sample set, by source file name
SAMPLE_EXPECTED = {
    "imported": 23,
    "skipped": ("broken_empty.jpg", "broken_text.png", "broken_truncated.jpg", "notes.md"),
    "image_shape_filter": tuple(n for n, _, _ in _TOO_SMALL),
    "image_aspect_ratio_filter": tuple(n for n, _, _ in _BAD_ASPECT),
    "image_size_filter": ("blank_flat.png",),
    "image_deduplicator": ("good_04_copy.jpg", "good_04_resaved.jpg"),
    "kept": 15,
}

_CAPTIONS: dict[str, bytes] = {
    "good_01_square.txt": "一个女孩，水墨画\n".encode(),
    "good_02_wide.txt": "远山与小船，水墨画".encode(),
    "good_03_tall.txt": b"",  # empty: default caption with a warning
    "good_04.txt": "古风少女站在桥上，工笔画".encode("gbk"),  # not UTF-8: decoded as GB18030 with a warning
    "good_05.txt": "\ufeff  樱花树下的少女，水彩  \r\n".encode(),  # BOM and stray whitespace
    "exif_rotated.txt": "竖幅人像，水墨画".encode(),
}


def _mark(img: Image.Image, colour: tuple[int, ...], box: int = 160) -> Image.Image:
    """Paint a flat square in the top-left corner, a spot the tests can read back."""
    ImageDraw.Draw(img).rectangle((0, 0, box - 1, box - 1), fill=colour)
    return img


def _save(img: Image.Image, path: Path, **kwargs: Any) -> None:
    """Save with fixed settings so the same seed gives the same bytes."""
    if path.suffix == ".png":
        img.save(path, format="PNG", compress_level=3, **kwargs)
    else:
        img.save(path, format="JPEG", quality=kwargs.pop("quality", 90), **kwargs)


def phash(img: Image.Image) -> str:
    """64-bit perceptual hash as imagededup's PHash (Data-Juicer's image_deduplicator) computes it."""
    small = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS).convert("L"), np.float64)
    n = np.arange(32)
    basis = 2.0 * np.cos(np.pi * n[:, None] * (2 * n[None, :] + 1) / 64)  # DCT-II, scipy's unnormalised form
    # rounding makes a flat image's float noise compare as the exact zeros scipy's DCT gives
    coef = np.round((basis @ small @ basis.T)[:8, :8], 6)
    bits = (coef >= np.median(coef.flatten()[1:])).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _near_duplicate(original: Path, dest: Path) -> None:
    """Write a resized, re-encoded copy of `original` that still has the same phash."""
    with Image.open(original) as src:
        img = src.convert("RGB")
    target = phash(img)
    # a ~1 % resize rarely moves a hash bit, but "rarely" is not "never": try a few until one matches
    for grow, quality in ((16, 75), (8, 80), (24, 70), (4, 85), (32, 75), (0, 60)):
        size = (img.width + grow, img.height + round(grow * img.height / img.width))
        buf = io.BytesIO()
        img.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
        with Image.open(io.BytesIO(buf.getvalue())) as near:
            if phash(near) == target:
                break
    dest.write_bytes(buf.getvalue())


def _sample_files(dest: Path, seed: int) -> None:
    """Write every sample file into `dest` (an empty folder)."""
    rng = np.random.default_rng(seed)
    steps = [*_GOOD, *_TOO_SMALL, *_BAD_ASPECT]
    for name, w, h in tqdm(steps, desc="sample images", unit="img", leave=False):
        # light grain for PNGs: lossless noise is slow to write and costs megabytes
        _save(_art(rng, w, h, noise=3 if name.endswith(".png") else 10), dest / name)
    _near_duplicate(dest / "good_04.jpg", dest / "good_04_resaved.jpg")
    shutil.copyfile(dest / "good_04.jpg", dest / "good_04_copy.jpg")  # exact byte copy
    Image.new("RGB", (1024, 1024), (236, 232, 222)).save(dest / "blank_flat.png", format="PNG")

    # odd but valid modes: each must import as 8-bit RGB
    _save(_mark(_art(rng, 1024, 1024), MARK_RED).convert("CMYK"), dest / "mode_cmyk.jpg")
    ramp = np.tile(np.linspace(0, 65535, 1024), (1024, 1)) + rng.normal(0, 1500, (1024, 1024))
    ramp[:160, :160] = 65535  # white marker: must become 255, not clip everything above 255
    ramp[:160, 160:320] = 128 * 257  # mid-grey marker: must become 128
    gray16 = Image.fromarray(np.clip(ramp, 0, 65535).astype(np.uint16))
    gray16.save(dest / "mode_gray16.png", format="PNG")
    _save(_mark(_art(rng, 1024, 1024), MARK_RED).quantize(colors=256, dither=Image.Dither.NONE),
          dest / "mode_palette.png")
    rgba = _art(rng, 1024, 1024).convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 0, 159, 159), fill=0)  # fully transparent corner, black underneath
    ImageDraw.Draw(rgba).rectangle((0, 0, 159, 159), fill=(0, 0, 0, 255))
    ImageDraw.Draw(rgba).rectangle((0, 160, 159, 319), fill=MARK_SEMI + (255,))
    ImageDraw.Draw(alpha).rectangle((0, 160, 159, 319), fill=128)
    rgba.putalpha(alpha)
    _save(rgba, dest / "mode_rgba.png")
    # EXIF orientation 6: stored lying down (1536x1024), shown upright (1024x1536) with the marker top-left
    upright = _mark(_art(rng, 1024, 1536), MARK_RED)
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = 6
    _save(upright.transpose(Image.Transpose.ROTATE_90), dest / "exif_rotated.jpg", exif=exif.tobytes())

    # broken files: each is a reported skip
    (dest / "broken_empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    _art(rng, 1024, 1024).save(whole, format="JPEG", quality=90)
    (dest / "broken_truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (dest / "broken_text.png").write_text("this is a text file, not a PNG\n", encoding="utf-8")
    (dest / "notes.md").write_text("# Sample set\nGenerated by kolors_lib.data.make_sample_images.\n",
                                   encoding="utf-8")
    for name, raw in _CAPTIONS.items():
        (dest / name).write_bytes(raw)


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every non-hidden file below `folder`, by relative path."""
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in _walk(folder)}


def make_sample_images(dest: Path, seed: int = 0) -> Path:
    """Write the deterministic sample source folder (good, filtered, odd and broken files) into `dest`."""
    dest = Path(dest)
    manifest = dest / _SAMPLE_MANIFEST
    if manifest.is_file():
        try:
            known = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            known = {}
        # an intact folder from the same seed is reused: regenerating would only rewrite the same bytes
        if known.get("seed") == seed and known.get("version") == _SAMPLE_VERSION \
                and known.get("files") == _file_hashes(dest):
            return dest
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} exists and is not a sample folder made by make_sample_images; "
                        "refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _sample_files(tmp, seed)
        info = {"seed": seed, "version": _SAMPLE_VERSION, "files": _file_hashes(tmp)}
        (tmp / _SAMPLE_MANIFEST).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
