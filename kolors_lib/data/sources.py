"""Step 01's inputs: a local image folder read with its captions (metadata.jsonl, same-named .txt).

Nothing here writes: it lists what to import (`SourceItem`s) and why a file or line is skipped, so the
import itself (kolors_lib.data.importer) stays one place that decodes and writes.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAME = "metadata.jsonl"
# no image or caption the course uses comes near this; a link to /dev/zero or a huge file stops here
MAX_FILE_BYTES = 1 << 30


@dataclass
class SourceItem:
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


def is_inside(path: Path, root: Path) -> bool:
    """True when `path` is `root` or below it (both resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def walk_files(root: Path, skipped: list[dict] | None = None) -> list[str]:
    """Every non-hidden readable file below `root`, as sorted relative POSIX paths (symlinked dirs not followed).

    Only regular files are listed: FIFOs and devices (a read would hang or never end), links that
    point outside `root` and names that are not valid UTF-8 are left out, each with a reason in
    `skipped` when given.
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (base / name).relative_to(root).as_posix()
            why = _unreadable(root, base / name, rel)
            if why is None:
                found.append(rel)
            elif skipped is not None:
                skipped.append({"source": printable(rel), "reason": why})
    return sorted(found)


def printable(name: str) -> str:
    """A file name as text that can be printed and written to JSON (undecodable bytes as \\xNN)."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def _unreadable(root: Path, path: Path, rel: str) -> str | None:
    """Why the file at `path` must not be read, or None when it is a regular file we may read."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename the file to import it)"
    if path.is_symlink() and not is_inside(path, root):
        return f"symbolic link to {printable(os.readlink(path))}, outside the source folder"
    try:
        st = path.stat()
    except OSError as err:
        return f"cannot read file: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, device or socket)"
    if st.st_size > MAX_FILE_BYTES:
        return f"file is {st.st_size} bytes, above the {MAX_FILE_BYTES} byte limit"
    return None


def read_limited(path: Path, limit: int | None = None) -> bytes:
    """A file's bytes, refusing anything but a regular file of at most `limit` bytes (OSError otherwise)."""
    limit = MAX_FILE_BYTES if limit is None else limit
    # O_NONBLOCK: opening a FIFO that replaced the file since it was listed must not wait for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data


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
    lines = read_limited(root / METADATA_NAME).decode("utf-8-sig", errors="replace").splitlines()
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
                or not is_inside(root / rel, root):
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
    text, warning = decode_caption(read_limited(root / txt))
    if warning:
        notes.append({"source": txt, "message": warning})
    return text, notes


def folder_items(root: Path, skipped: list[dict], warns: list[dict]) -> list[SourceItem]:
    """List a local folder's images with their captions; non-images and bad metadata lines are skips."""
    files = walk_files(root, skipped)
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
        items.append(SourceItem(source=rel, path=root / rel, caption=caption, notes=notes))
    return items
