"""The generated sample source folder: good, filtered, odd and broken images for offline runs and tests.

`make_sample_images(dest, seed)` writes the same bytes for the same seed; `SAMPLE_EXPECTED` says what
step 01 skips and what each step-02 filter removes from it.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from kolors_lib.core.errors import DataError
from kolors_lib.core.files import sha256_file, staged_folder
from kolors_lib.core.images import ORIENTATION_TAG
from kolors_lib.data.sources import walk_files

_SAMPLE_VERSION = 1
_SAMPLE_MANIFEST = ".sample-manifest.json"


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
    """64-bit perceptual hash, by imagededup's PHash (what Data-Juicer's image_deduplicator uses)."""
    return _phasher().encode_image(image_array=np.asarray(img.convert("RGB")))


@functools.cache
def _phasher() -> Any:
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()  # imagededup.methods also imports its CNN (torchvision)
    from imagededup.methods import PHash

    return PHash(verbose=False)


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
    exif[ORIENTATION_TAG] = 6
    _save(upright.transpose(Image.Transpose.ROTATE_90), dest / "exif_rotated.jpg", exif=exif.tobytes())

    # broken files: each is a reported skip
    (dest / "broken_empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    _art(rng, 1024, 1024).save(whole, format="JPEG", quality=90)
    (dest / "broken_truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (dest / "broken_text.png").write_text("this is a text file, not a PNG\n", encoding="utf-8")
    (dest / "notes.md").write_text("# Sample set\nGenerated by kolors_lib.data.samples.make_sample_images.\n",
                                   encoding="utf-8")
    for name, raw in _CAPTIONS.items():
        (dest / name).write_bytes(raw)


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every non-hidden file below `folder`, by relative path."""
    return {rel: sha256_file(folder / rel) for rel in walk_files(folder)}


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
    with staged_folder(dest) as tmp:
        _sample_files(tmp, seed)
        info = {"seed": seed, "version": _SAMPLE_VERSION, "files": _file_hashes(tmp)}
        (tmp / _SAMPLE_MANIFEST).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    return dest
