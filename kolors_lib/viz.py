"""Pictures for the notebooks: fonts that can draw the Chinese prompts and scene names."""

from __future__ import annotations

from pathlib import Path

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
