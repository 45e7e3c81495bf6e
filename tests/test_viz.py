"""Chinese scene names and captions are drawn with a real CJK font, never as tofu boxes."""

from __future__ import annotations

from pathlib import Path

from matplotlib import ft2font
from PIL import Image

from kolors_lib.core.images import find_cjk_font, image_grid, register_bundled_cjk_font


def test_bundled_font_draws_the_story_scene_names() -> None:
    bundled = register_bundled_cjk_font()
    assert bundled is not None and bundled.is_file()
    font = find_cjk_font("女主正在上课，梦醒了")
    assert font is not None
    face = ft2font.FT2Font(str(font))
    assert all(face.get_char_index(ord(c)) for c in "女主正在上课梦醒了")
    assert find_cjk_font("plain ascii") is None


def test_thumbnail_titles_use_the_cjk_font(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
    fig = image_grid([path], ["一个女孩，水墨画"])
    title = fig.axes[0].title
    assert title.get_text() == "一个女孩，水墨画"
    assert Path(title.get_fontproperties().get_file()) == find_cjk_font("一个女孩")


def test_the_grid_takes_pictures_in_memory_beside_files(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
    in_memory = Image.new("L", (300, 150), 255)  # grey and larger than a cell: converted and shrunk, not changed
    fig = image_grid([path, in_memory], ["file", "picture"], thumb=100)
    assert [ax.title.get_text() for ax in fig.axes] == ["file", "picture"]
    shown = fig.axes[1].images[0].get_array()
    assert shown.shape == (50, 100, 3) and np.all(np.asarray(shown) == 255)
    assert in_memory.size == (300, 150) and in_memory.mode == "L"
    assert fig.axes[0].images[0].get_array()[0, 0].tolist() == [10, 200, 30]
    assert image_grid([in_memory]).axes[0].title.get_text() == "image 1"
