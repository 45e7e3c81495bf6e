"""Pictures for every step: one captioned image grid, fonts that draw the Chinese prompts, 8-bit RGB.

The grid is a bare matplotlib Figure (no pyplot), so it works headless and in saved notebooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

ORIENTATION_TAG = 0x0112  # the EXIF tag that says how a photo was rotated

CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Source Han", "WenQuanYi", "Droid Sans Fallback", "SimHei",
                  "Microsoft YaHei", "PingFang", "Hiragino Sans GB", "AR PL", "Heiti", "Songti", "SimSun",
                  "Arial Unicode", "Unifont")
_TOFU_FONTS = ("Last Resort",)  # fonts that "have" every glyph by drawing a placeholder box


def register_bundled_cjk_font() -> Path | None:
    """Register the Noto Sans CJK SC font that the `mplfonts` package ships (a pinned dependency)."""
    import importlib.util

    from matplotlib import font_manager

    spec = importlib.util.find_spec("mplfonts")
    if spec is None or not spec.submodule_search_locations:
        return None
    font = Path(next(iter(spec.submodule_search_locations))) / "fonts" / "NotoSansCJKsc-Regular.otf"
    if not font.is_file():
        return None
    if all(f.fname != str(font) for f in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(str(font))
    return font


def find_cjk_font(text: str) -> Path | None:
    """An installed font file with a glyph for every non-ASCII character of `text` (None: none is).

    Fonts known to carry Chinese are tried first; placeholder fonts (Last Resort) never count.
    """
    from matplotlib import font_manager, ft2font

    register_bundled_cjk_font()

    needed = {c for c in text if not c.isascii() and not c.isspace()}
    if not needed:
        return None
    entries = [f for f in font_manager.fontManager.ttflist if not any(t in f.name for t in _TOFU_FONTS)]
    entries.sort(key=lambda f: (not any(h.lower() in f.name.lower() for h in CJK_FONT_HINTS), f.fname))
    seen: set[str] = set()
    for entry in entries:
        if entry.fname in seen:
            continue
        seen.add(entry.fname)
        try:
            font = ft2font.FT2Font(entry.fname)
        except (OSError, RuntimeError, ValueError):
            continue
        if all(font.get_char_index(ord(c)) for c in needed):
            return Path(entry.fname)
    return None


def font_properties(text: str):  # noqa: ANN201 - matplotlib type
    """matplotlib FontProperties able to draw `text` (None when it is ASCII or no font can)."""
    from matplotlib.font_manager import FontProperties

    font = find_cjk_font(text)
    return FontProperties(fname=str(font)) if font else None


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns (image, note) where note says what changed."""
    import numpy as np
    from PIL import Image

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
        raise ValueError(f"unsupported colour mode {mode}: {err}") from None


def _clip(caption: str, width: int) -> str:
    """Each line of `caption` cut to `width` characters (an ellipsis marks the cut)."""
    return "\n".join(line if len(line) <= width else line[:width - 1] + "…" for line in caption.split("\n"))


def _thumbnail(source: Path | Image.Image, pixels: int) -> Image.Image:
    """The image (a file, or a picture in memory) upright, in 8-bit RGB, no larger than `pixels` on a side."""
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        img = source.copy()  # thumbnail() works in place: the caller's picture stays as it is
        img.thumbnail((pixels, pixels))
        return to_rgb(img)[0]
    with Image.open(source) as img:
        img = ImageOps.exif_transpose(img)
        img.thumbnail((pixels, pixels))
        return to_rgb(img)[0]


def image_grid(images: Sequence[str | Path | Image.Image], captions: Sequence[str] | None = None, *, cols: int = 6,
               thumb: int = 160, title: str = "", font: Path | None = None, fontsize: int = 7,
               max_chars: int = 24, empty: str = "no images") -> Figure:
    """A grid of `images` (files or PIL pictures) with one caption each (default: the file name) as a Figure.

    `thumb` is the cell size in pixels; a font that draws the captions' Chinese is found when `font`
    is None; an unreadable file shows a placeholder instead of hiding the rest of the grid.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from PIL import Image

    paths = [p if isinstance(p, Image.Image) else Path(p) for p in images]
    texts = [(captions[i] if captions and i < len(captions) else getattr(p, "name", f"image {i + 1}"))
             for i, p in enumerate(paths)]
    font = font or find_cjk_font(title + "".join(texts))
    props = FontProperties(fname=str(font)) if font is not None else None
    cols = max(1, min(cols, len(paths) or 1))
    rows = max(1, math.ceil(len(paths) / cols))
    inch, lines = thumb / 100, max((t.count("\n") + 1 for t in texts), default=1)
    fig = Figure(figsize=(cols * inch, rows * (inch + 0.15 + 0.15 * lines) + (0.4 if title else 0)), dpi=100)
    if not paths:
        fig.text(0.5, 0.5, empty, ha="center", va="center")
        return fig
    axes = fig.subplots(rows, cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= len(paths):
            continue
        try:
            ax.imshow(np.asarray(_thumbnail(paths[index], thumb)))  # the cell's size: no more memory than shown
        except Exception as err:  # one unreadable file should not hide the rest of the grid
            ax.text(0.5, 0.5, f"unreadable\n{type(err).__name__}", ha="center", va="center", fontsize=7)
        ax.set_title(_clip(texts[index], max_chars), fontsize=fontsize, fontproperties=props)
    if title:
        fig.suptitle(title, fontproperties=props, fontsize=fontsize + 3)
    fig.tight_layout()
    return fig


def side_by_side(tiles: Sequence[Image.Image]) -> Image.Image:
    """Images pasted left to right into one RGB image (top-aligned)."""
    from PIL import Image

    grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    x = 0
    for tile in tiles:
        grid.paste(tile, (x, 0))
        x += tile.width
    return grid
