"""Step 06's model-card preview: the card as ModelScope shows it, readable inside a notebook.

A notebook renders markdown relative to the notebook's own folder, so the card's `samples/...` images
would not resolve, and its YAML front matter (ModelScope's page settings) would render as a mangled
list. The preview shows the front matter as a YAML block and embeds the images as small thumbnails.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from IPython.display import Markdown

_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)")
_FRONT_MATTER = re.compile(r"\A---\n(?P<yaml>.*?)\n---\n", re.DOTALL)


def split_front_matter(text: str) -> tuple[str, str]:
    """(YAML front matter without its `---` lines, the markdown after it); ("", text) when there is none."""
    text = text.replace("\r\n", "\n")
    m = _FRONT_MATTER.match(text)
    return (m.group("yaml"), text[m.end():]) if m else ("", text)


def thumbnail_uri(path: Path, width: int) -> str:
    """A `data:` URI of the picture shrunk to at most `width` pixels wide (PNG)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width > width:
            img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def card_markdown(folder: str | Path, width: int = 320) -> str:
    """The upload folder's README.md with its front matter as a YAML block and its images embedded."""
    folder = Path(folder)
    front, body = split_front_matter((folder / "README.md").read_text(encoding="utf-8"))

    def embed(m: re.Match[str]) -> str:
        src = m.group("src")
        if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.IGNORECASE):  # http:, data: ... already resolvable
            return m.group(0)
        path = folder / src
        if not path.is_file():
            return f"*(image missing from the upload folder: `{src}`)*"
        wide = width * 2 if "storyboard" in path.stem else width  # the grid holds 8 panels
        return f"![{m.group('alt')}]({thumbnail_uri(path, wide)})"

    head = f"*Page settings (front matter) ModelScope reads:*\n\n```yaml\n{front}\n```\n\n" if front else ""
    return head + _IMAGE.sub(embed, body)


def card_preview(folder: str | Path, width: int = 320) -> Markdown:
    """The model card of `folder` (the upload folder of step 06) for display in a notebook."""
    from IPython.display import Markdown

    return Markdown(card_markdown(folder, width))
