"""The toy Kolors' world: one flat-coloured shape on a plain ground, captioned in Chinese as Kolors reads.

`draw(scene, size, rng)` paints a scene; the same scene in the 水墨 (ink) style gives grey tones, a dark
outline and paper-white ground, the look a LoRA is to learn. `measure(picture)` reads back what a
picture shows by pixel statistics (the foreground's hue and its fill of its bounding box), which is
how tests check that the toy model draws what it is asked.
"""

from __future__ import annotations

import colorsys
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB. Object colours are distinct in hue; grounds are neutral so an object's hue is its own.
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (215, 35, 35), "蓝色": (35, 75, 215), "绿色": (35, 165, 60), "黄色": (235, 200, 30)}
GROUNDS: dict[str, tuple[int, int, int]] = {"白色": (245, 245, 245), "黑色": (25, 25, 25), "灰色": (128, 128, 128)}
SHAPES = ("圆形", "方形", "三角形")
HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}
PAPER = (242, 238, 228)  # the ink style's ground, whatever the caption says
INK = (30, 30, 30)
# kept out of the training set so a test can ask for a combination the model never saw
HELD_OUT = (("黄色", "三角形", "黑色"), ("蓝色", "圆形", "灰色"), ("绿色", "方形", "白色"))
CAPTION = re.compile(r"一个(\S+?)的(\S+?)[，,]\s*(\S+?)的背景")  # step 02 rewrites "，" as ", "


@dataclass(frozen=True)
class Scene:
    """What one picture shows: an object's colour and shape, the ground's colour."""

    colour: str
    shape: str
    ground: str

    @property
    def caption(self) -> str:
        """The caption, in the contract's wording: 一个红色的圆形，白色的背景."""
        return f"一个{self.colour}的{self.shape}，{self.ground}的背景"


def parse(prompt: str) -> Scene | None:
    """The scene a prompt asks for (anywhere in it), or None when it names no known one."""
    for colour, shape, ground in CAPTION.findall(prompt):
        if colour in COLOURS and shape in SHAPES and ground in GROUNDS:
            return Scene(colour, shape, ground)
    return None


def all_scenes(held_out: bool = False) -> list[Scene]:
    """Every scene of the world, without (default) or only the held-out combinations."""
    scenes = [Scene(c, s, g) for c in COLOURS for s in SHAPES for g in GROUNDS]
    return [s for s in scenes if ((s.colour, s.shape, s.ground) in HELD_OUT) == held_out]


def _outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)] if shape == "三角形" else None


def draw(scene: Scene, size: int, rng: np.random.Generator, ink: bool = False, supersample: int = 4) -> Image.Image:
    """One picture of `scene`: the object at a random size and place, drawn larger then reduced (smooth edges)."""
    big = supersample * size
    # large, in the middle, varying in size: on 8x8 latents a shape needs some 5 latent pixels across to be
    # told apart, and a small model on a few CPU-minutes learns shapes in one place, not everywhere
    side = rng.uniform(0.55, 0.75) * big
    cx, cy = (big / 2 + rng.uniform(-0.04, 0.04) * big for _ in range(2))
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    ground, fill, line = GROUNDS[scene.ground], COLOURS[scene.colour], None
    if ink:  # grey wash of the colour's lightness, a dark brush outline, paper ground
        grey = int(70 + 0.6 * (0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]))
        ground, fill, line = PAPER, (grey, grey, grey - 4), INK
    image = Image.new("RGB", (big, big), ground)
    pen = ImageDraw.Draw(image)
    width = int(big * 0.035) if line else 0
    points = _outline(scene.shape, box)
    if points:
        pen.polygon(points, fill=fill, outline=line, width=width)
    elif scene.shape == "圆形":
        pen.ellipse(box, fill=fill, outline=line, width=width)
    else:
        pen.rectangle(box, fill=fill, outline=line, width=width)
    return image.resize((size, size), Image.Resampling.BOX)


def samples(count: int, size: int, seed: int, ink: bool = False, scenes: list[Scene] | None = None,
            supersample: int = 4) -> list[tuple[Image.Image, Scene]]:
    """`count` pictures drawn from `scenes` (default: the training scenes), the same for the same seed."""
    rng = np.random.default_rng(seed)
    pool = scenes or all_scenes()
    picks = rng.integers(0, len(pool), count)
    return [(draw(pool[i], size, rng, ink, supersample), pool[i]) for i in picks]


INK_SET_VERSION = 1


def make_ink_images(dest: Path, seed: int, count: int = 16, size: int = 1024) -> Path:
    """The toy profile's step-01 source: `count` 水墨 pictures of the world with .txt captions (content only)."""
    from kolors_lib.core.files import staged_folder, write_json

    dest = Path(dest)
    info = {"seed": seed, "count": count, "size": size, "version": INK_SET_VERSION}
    manifest = dest / ".ink-manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")) == info:
        return dest
    grain = np.random.default_rng(seed + 1)
    with staged_folder(dest) as tmp:
        for i, (picture, scene) in enumerate(samples(count, size, seed, ink=True, supersample=1)):
            # paper grain: the look of xuan paper, and it keeps each PNG above step 02's 20 KB minimum
            noisy = np.asarray(picture, dtype=np.int16) + grain.integers(-6, 7, (size, size, 1))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(tmp / f"ink_{i:02d}.png", format="PNG")
            (tmp / f"ink_{i:02d}.txt").write_text(scene.caption, encoding="utf-8")
        write_json(info, tmp / manifest.name)
    return dest


@dataclass(frozen=True)
class Reading:
    """What a picture shows by pixel statistics."""

    colour: str | None  # nearest object colour by hue (None: no foreground)
    shape: str | None  # the shape read from the foreground's outline (shape_of)
    fill: float  # foreground pixels / bounding box area
    saturation: float  # mean HSV saturation of the whole picture


def foreground(picture: Image.Image) -> np.ndarray:
    """The object's pixels: far from the border's median colour, the largest such region, holes filled.

    "Far" is half the way to the farthest colour (at least 30 of 441): a soft edge's half-way point is
    where the shape's edge is, and a blotch inside the object is not a hole in its outline.
    """
    from scipy import ndimage

    rgb = np.asarray(picture.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    dist = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)
    far = dist > max(30.0, 0.5 * float(np.percentile(dist, 99)))
    labels, count = ndimage.label(far)
    if count == 0:
        return far
    sizes = ndimage.sum(far, labels, range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def measure(picture: Image.Image) -> Reading:
    """What `picture` shows: its foreground's mean hue (colour) and outline (shape), and its box fill."""
    hsv = np.asarray(picture.convert("RGB").convert("HSV"), dtype=np.float32) / 255
    far = foreground(picture)
    saturation = float(hsv[..., 1].mean())
    if far.sum() < 0.01 * far.size:
        return Reading(None, None, 0.0, saturation)
    ys, xs = np.nonzero(far)
    fill = float(far.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    # hue is circular: average it as an angle, weighted by saturation (grey pixels say nothing)
    angle = hsv[..., 0][far] * 2 * np.pi
    weight = hsv[..., 1][far] + 1e-6
    hue = (np.arctan2((np.sin(angle) * weight).sum(), (np.cos(angle) * weight).sum()) / (2 * np.pi)) % 1.0
    colour = min(HUES, key=lambda n: min(abs(HUES[n] - hue), 1 - abs(HUES[n] - hue)))
    return Reading(colour, shape_of(far[ys.min():ys.max() + 1, xs.min():xs.max() + 1]), fill, saturation)


def shape_of(box: np.ndarray) -> str:
    """The shape whose outline `box` (the foreground in its bounding box) is nearest to, read in ways blur keeps.

    A triangle (apex up) fills its top quarter far less than its bottom quarter (ideal 1:7); a square fills
    the corners of its box, a disc does not (corner cells of 1/5 the side: square 1, disc 0.14). Soft edges
    move one fill ratio of the whole box towards the middle of the three; these two contrasts survive them.
    """
    quarter = max(1, box.shape[0] // 4)
    top, bottom = box[:quarter].mean(), box[-quarter:].mean()
    if top < 0.45 * bottom:
        return "三角形"
    h, w = max(1, box.shape[0] // 5), max(1, box.shape[1] // 5)
    corners = np.mean([box[:h, :w].mean(), box[:h, -w:].mean(), box[-h:, :w].mean(), box[-h:, -w:].mean()])
    return "方形" if corners > 0.55 else "圆形"
