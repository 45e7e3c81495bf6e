"""One captioned image grid for every step's pictures (a bare matplotlib Figure: no pyplot)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kolors_lib.viz import find_cjk_font

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image


def _clip(caption: str, width: int) -> str:
    """Each line of `caption` cut to `width` characters (an ellipsis marks the cut)."""
    return "\n".join(line if len(line) <= width else line[:width - 1] + "…" for line in caption.split("\n"))


def _thumbnail(path: Path, pixels: int) -> Image.Image:
    """The image upright, in 8-bit RGB, no larger than `pixels` on a side."""
    from PIL import Image, ImageOps

    from kolors_lib.data import to_rgb

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        img.thumbnail((pixels, pixels))
        return to_rgb(img)[0]


def image_grid(images: Sequence[str | Path], captions: Sequence[str] | None = None, *, cols: int = 6,
               thumb: int = 160, title: str = "", font: Path | None = None, fontsize: int = 7,
               max_chars: int = 24, empty: str = "no images") -> Figure:
    """A grid of `images` with one caption each (default: the file name) as a matplotlib Figure.

    `thumb` is the cell size in pixels; a font that draws the captions' Chinese is found when `font`
    is None; an unreadable file shows a placeholder instead of hiding the rest of the grid.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    paths = [Path(p) for p in images]
    texts = [(captions[i] if captions and i < len(captions) else p.name) for i, p in enumerate(paths)]
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
