"""Step 04: render the storyboard (the challenge's 8 panels) with Kolors + the trained LoRA (DiffSynth 1.1.9).

How a storyboard is rendered (`render_storyboard`):

1. The story file is read and validated (scenes, prompts, seeds, sizes) before any model loads; a story
   of other than the challenge's 8 scenes renders too, with a notice.
2. The LoRA file is read (a missing file says to run step 03) and checked against the UNet: a LoRA
   that does not fit fails before anything is encoded or denoised.
3. Kolors is loaded from the profile and the LoRA merged at `strength` (1.0 = the training scale
   alpha/rank, see :mod:`kolors_lib.kolors.lora`).
4. **Phase 1, text:** ChatGLM encodes the scenes' prompts and the negative prompt, once each. Then it is
   released (moved off the GPU, its references dropped, the CUDA cache emptied), so the GPU holds
   ChatGLM (11.6 GiB fp16) *or* UNet + VAE (4.9 GiB), never both: peak = max of the phases, not the sum.
   With a CUDA device the models are loaded on the CPU and each phase moves only what it needs.
5. **Phase 2, pixels:** every panel is rendered by DiffSynth's own `SDXLImagePipeline.__call__`
   (scheduler, CFG, add_time_ids, seeded latents, VAE decode: all stock) whose `encode_prompt` is
   replaced by a look-up in the phase-1 embeddings. Same seed -> same pixels as a plain pipeline call.

Outputs in `cfg.storyboard_dir`: panel_01.png .. panel_08.png (one per scene), storyboard.png (a grid of
4 columns with captions) and manifest.json (everything needed to re-render a panel, see `reproduce`).

`render` draws one prompt at one or more strengths and seeds (cfg.renders_dir); `strength_sweep` one
scene at several strengths; `refine` re-renders a picture (img2img). The renderer and the LoRA merger
live in :mod:`kolors_lib.kolors.renderer` (importable from here too).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_lib.core.checks import SIZE_MULTIPLE, finite, image_side, integer, output_name
from kolors_lib.core.checks import seed as checked_seed
from kolors_lib.core.config import GRID_FILE, LORA_FILE, MANIFEST_FILE, Config, panel_file
from kolors_lib.core.console import logged_step
from kolors_lib.core.devices import resolve_device
from kolors_lib.core.errors import ConfigError, LoraMismatchError, MissingInputError, StoryError
from kolors_lib.core.files import atomic_path, sha256_file, staged_folder, write_json
from kolors_lib.core.images import find_cjk_font
from kolors_lib.core.lock import one_writer
from kolors_lib.kolors.merger import LoraMerger, checked_strength
from kolors_lib.kolors.renderer import (
    KolorsRenderer,
    check_lora_against,
    default_dtype,
    default_lora_path,
    dtype_name,
    package_version,
    read_lora,
    save_png,
)
from kolors_lib.kolors.story import RenderSettings, Scene, Story, load_story, render_settings, with_trigger

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from kolors_lib.kolors.lora import LoraSpec
    from kolors_lib.kolors.renderer import SamplerStep

MANIFEST_NAME = MANIFEST_FILE
GRID_NAME = GRID_FILE
SWEEP_NAME = "sweep.png"
LORA_NAME = LORA_FILE  # what step 03 writes into cfg.lora_dir
MANIFEST_VERSION = 1
# families that carry Chinese glyphs; any installed font with every glyph needed is accepted too


# ---------------------------------------------------------------- captions and grids


def panel_captions(scenes: Sequence[Scene], font: Path | None) -> list[str]:
    """'01 女主正在上课' with a CJK font; ASCII '01 · seed 1' without one (never tofu boxes)."""
    out = []
    for i, scene in enumerate(scenes, start=1):
        if font is not None or scene.scene.isascii():
            out.append(f"{i:02d} {scene.scene}")
        else:
            out.append(f"{i:02d} · seed {scene.seed}")
    return out


def grid_figure(images: Sequence[Path], captions: Sequence[str], title: str = "", cols: int = 4,
                font: Path | None = None, thumb: float = 2.4) -> Figure:
    """The storyboard's captioned grid (cells `thumb` inches wide) as a matplotlib Figure."""
    from kolors_lib.core.images import image_grid

    return image_grid(images, captions, cols=cols, thumb=round(thumb * 100), title=title, font=font,
                      fontsize=9, max_chars=22)


def save_figure(fig: Figure, path: Path) -> Path:
    """Save a Figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ---------------------------------------------------------------- step 04: the storyboard


@dataclass
class StoryboardResult:
    """What render_storyboard wrote, and how it ran."""

    out_dir: Path
    panels: list[Path]
    grid: Path
    manifest: Path
    prompts: list[str]
    strength: float
    seconds: float
    peak_memory: dict[str, int | None] = field(default_factory=dict)
    font: Path | None = None

    def figure(self) -> Figure:
        """The storyboard grid as a Figure, for the notebook."""
        data = json.loads(self.manifest.read_text(encoding="utf-8"))
        scenes = [Scene(p["scene"], p["prompt"], p["seed"]) for p in data["panels"]]
        return grid_figure(self.panels, panel_captions(scenes, self.font), font=self.font,
                           cols=min(4, len(self.panels)))


def _base_model_info(cfg: Config | None, root: Path) -> dict[str, Any]:
    model_id = cfg.models.kolors.model_id if cfg is not None else None
    return {"model_id": model_id, "folder": str(Path(root).resolve()),
            "profile": cfg.profile if cfg is not None else None}


def _lora_info(lora: LoraSpec, strength: float) -> dict[str, Any]:
    return {"file": str(lora.path), "sha256": lora.sha256, "strength": float(strength), "rank": lora.rank,
            "alpha": lora.alpha, "effective_scale": float(strength) * lora.scale,
            "strength_meaning": "1.0 = the training scale alpha/rank; W += strength*alpha/rank*B*A",
            "trigger_word": lora.meta.get("trigger_word")}


def trigger_word(cfg: Config) -> str:
    """The trigger word prepended to prompts ("" when generate.add_trigger_word is off)."""
    return cfg.filter.trigger_word if cfg.generate.add_trigger_word else ""


def prepare_renderer(cfg: Config, lora_path: str | Path | None, prompts: Sequence[str],
                     negatives: Sequence[str]) -> tuple[LoraSpec, KolorsRenderer]:
    """The set-up every rendering step shares: read and check the LoRA, load Kolors, encode the prompts.

    A missing or misfitting LoRA fails here, before any model weight is loaded or any prompt encoded.
    """
    from kolors_lib.kolors.models import kolors_paths

    lora = read_lora(lora_path or default_lora_path(cfg), cfg)
    root = kolors_paths(cfg).root
    check_lora_against(root, lora)
    renderer = KolorsRenderer.for_config(cfg, root)  # every model where the device plan puts it
    renderer.encode(prompts, negatives)
    return lora, renderer


def _storyboard_manifest(cfg: Config, story: Story, settings: RenderSettings, lora: LoraSpec, strength: float,
                         renderer: KolorsRenderer, panels: list[Path], prompts: list[str], grid: Path,
                         seeds: list[int], selection: Any = None) -> dict:
    """manifest.json: everything needed to re-render any panel (see `reproduce`)."""
    shared = {"negative": settings.negative, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
              "width": settings.width, "height": settings.height}
    return {
        "version": MANIFEST_VERSION,
        "title": story.title,
        "story_file": str(story.path),
        "story_sha256": sha256_file(story.path) if story.path else None,
        "base_model": _base_model_info(cfg, renderer.root),
        "lora": _lora_info(lora, strength),
        "pipeline": "diffsynth.SDXLImagePipeline (Kolors: ChatGLM3 text encoder)",
        "scheduler": renderer.scheduler_info,
        "clip_skip": 1, "clip_skip_2": 2,
        "device": renderer.device, "dtype": dtype_name(renderer.dtype),
        "offload_text_encoder": cfg.generate.offload_text_encoder,
        "trigger_word": trigger_word(cfg) or None,
        "versions": {"diffsynth": package_version("diffsynth"), "torch": torch.__version__,
                     "transformers": package_version("transformers")},
        **shared,
        "panels": [{"index": i, "file": p.name, "scene": s.scene, "prompt": prompt, "story_prompt": s.prompt,
                    "seed": seeds[i], "story_seed": s.seed, **shared, "sha256": sha256_file(p)}
                   for i, (p, s, prompt) in enumerate(zip(panels, story.scenes, prompts, strict=True))],
        "selection": selection.to_dict() if selection else None,
        "grid": grid.name,
        "peak_memory_bytes": renderer.peak_memory,
    }


def _board_file(name: str) -> bool:
    """True for the files a storyboard render owns (panels, grid, manifest): a new render replaces them all."""
    return name in (MANIFEST_NAME, GRID_NAME) or (name.startswith("panel_") and name.endswith(".png"))


def _keep_others(old: Path, stage: Path) -> None:
    """Hard-link into the staged board what other calls keep in the folder (sweeps, refined, candidates...),
    so the swap replaces only the board's own files and the old folder stays whole until then."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if _board_file(entry.name) or (stage / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, stage / entry.name, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, stage / entry.name, follow_symlinks=False)


@logged_step("04_storyboard")
@one_writer("storyboard")
def render_storyboard(cfg: Config, story_path: str | Path | None = None, strength: float | None = None,
                      lora_path: str | Path | None = None, progress: bool = True,
                      candidates: int | None = None) -> StoryboardResult:
    """Render one panel per scene with Kolors + LoRA; write panels, storyboard.png and manifest.json.

    candidates > 1 (default generate.candidates): best-of-N seeds per scene, see kolors_lib/selection.py.
    """
    from kolors_lib.storyboard.selection import draft_budget

    start = time.monotonic()
    story = load_story(story_path or cfg.generate.story)  # before any model is loaded
    settings = render_settings(cfg, story)
    plan = draft_budget(cfg, settings, cfg.generate.candidates if candidates is None else candidates)
    if plan.candidates > 1 and progress:
        from kolors_lib.core.console import show

        show(plan.cost_line(len(story.scenes)))  # before minutes of model loading
    strength = checked_strength(cfg.generate.strength if strength is None else strength)
    prompts = [with_trigger(s.prompt, trigger_word(cfg)) for s in story.scenes]
    lora, renderer = prepare_renderer(cfg, lora_path, prompts, [settings.negative])
    # the new board is built beside the old one and swapped in whole at the end: an error, Ctrl-C or a
    # kill leaves the old board (panels, grid, manifest) as it was, never a mix of two renders
    with staged_folder(cfg.storyboard_dir) as stage:
        panels, grid, manifest = _render_board(cfg, story, settings, plan, lora, renderer, prompts, strength,
                                               stage, progress)
        _keep_others(cfg.storyboard_dir, stage)
    out = cfg.storyboard_dir
    return StoryboardResult(out, [out / p.name for p in panels], out / grid.name, out / manifest.name, prompts,
                            strength, time.monotonic() - start, dict(renderer.peak_memory), _font(story))


def _font(story: Story) -> Path | None:
    """A font with every glyph of the story's title and scene captions (None: ASCII captions)."""
    return find_cjk_font(story.title + "".join(s.scene for s in story.scenes))


def _render_board(cfg: Config, story: Story, settings: RenderSettings, plan: Any, lora: LoraSpec,
                  renderer: KolorsRenderer, prompts: list[str], strength: float, out: Path,
                  progress: bool) -> tuple[list[Path], Path, Path]:
    """Render the panels, the grid and the manifest into `out` (the staged folder); returns their paths."""
    from kolors_lib.core.console import progress as tqdm
    from kolors_lib.storyboard.selection import choose_seeds

    LoraMerger(renderer.unet, lora).set(strength)
    selection = None
    if plan.candidates > 1:  # best-of-N: draft, score and choose one seed per scene
        selection = choose_seeds(cfg, renderer, prompts, [s.seed for s in story.scenes], plan, progress)
    seeds = selection.seeds if selection else [s.seed for s in story.scenes]
    panels = []
    bar = tqdm(list(zip(seeds, prompts, strict=True)), desc="panels", unit="panel", disable=not progress)
    for number, (seed, prompt) in enumerate(bar, start=1):
        image = renderer.render(prompt, settings.negative, seed, settings.steps, settings.cfg_scale,
                                settings.width, settings.height)
        panels.append(save_png(image, out / panel_file(number)))

    font = _font(story)
    title = story.title if font is not None or story.title.isascii() else (story.path.stem if story.path else "")
    drawn = [Scene(s.scene, s.prompt, seed) for s, seed in zip(story.scenes, seeds, strict=True)]
    grid = save_figure(grid_figure(panels, panel_captions(drawn, font), title=title, font=font,
                                   cols=min(4, len(panels))), out / GRID_NAME)
    manifest = _storyboard_manifest(cfg, story, settings, lora, strength, renderer, panels, prompts, grid, seeds,
                                    selection)
    return panels, grid, write_json(manifest, out / MANIFEST_NAME)


def reproduce(manifest_path: str | Path, index: int, out_path: str | Path | None = None,
              device: str | None = None) -> Image.Image:
    """Re-render panel `index` (0-based: 0 is panel_01.png) from a manifest alone; returns the image.

    The base model folder and LoRA file named in the manifest are used; a LoRA whose sha256 changed
    raises. Same device and dtype as recorded give the same pixels.
    """
    manifest_path = Path(manifest_path)
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    panels = data["panels"]
    if not 0 <= index < len(panels):
        raise StoryError(f"{manifest_path}: panel index {index} out of range 0..{len(panels) - 1}")
    panel = panels[index]
    info = data["lora"]
    lora = read_lora(info["file"], alpha=info["alpha"])
    if lora.sha256 != info["sha256"]:
        raise LoraMismatchError(f"{lora.path} changed since {manifest_path} was written (sha256 differs): "
                                "render the storyboard again, or restore that LoRA file")
    device = resolve_device(device or data["device"])
    dtype = getattr(torch, data["dtype"]) if device == data["device"] else default_dtype(device)
    renderer = KolorsRenderer(Path(data["base_model"]["folder"]), device, dtype,
                              offload_text_encoder=data.get("offload_text_encoder", True))
    renderer.encode([panel["prompt"]], [panel["negative"]])
    LoraMerger(renderer.unet, lora).set(info["strength"])
    image = renderer.render(panel["prompt"], panel["negative"], panel["seed"], panel["steps"], panel["cfg_scale"],
                            panel["width"], panel["height"])
    if out_path is not None:
        save_png(image, Path(out_path))
    return image


@logged_step("04_storyboard")
def strength_sweep(cfg: Config, scene_index: int = 0, strengths: Sequence[float] | None = None,
                   story_path: str | Path | None = None, lora_path: str | Path | None = None,
                   progress: bool = True) -> Path:
    """One scene (0-based index) at several LoRA strengths (0 = base model) -> sweep.png; returns its path.

    The single images are kept in storyboard_dir/sweep/ (scene01_s0.50.png ...) with sweep.json.
    """
    from kolors_lib.core.console import progress as tqdm

    story = load_story(story_path or cfg.generate.story)
    if not 0 <= scene_index < len(story.scenes):
        raise StoryError(f"{story.path}: scene index {scene_index} out of range 0..{len(story.scenes) - 1}")
    settings = render_settings(cfg, story)
    strengths = [finite(s, "strength") for s in (cfg.generate.sweep_strengths if strengths is None else strengths)]
    if not strengths:
        raise ConfigError("strength_sweep needs at least one strength: pass strengths=[0, 0.5, 1] "
                          "or set generate.sweep_strengths")
    scene = story.scenes[scene_index]
    prompt = with_trigger(scene.prompt, trigger_word(cfg))
    lora, renderer = prepare_renderer(cfg, lora_path, [prompt], [settings.negative])
    merger = LoraMerger(renderer.unet, lora, keep_base=len(strengths) > 1)
    folder = cfg.storyboard_dir / "sweep"
    files = []
    for s in tqdm(strengths, desc="strengths", disable=not progress):
        merger.set(s)
        image = renderer.render(prompt, settings.negative, scene.seed, settings.steps, settings.cfg_scale,
                                settings.width, settings.height)
        files.append(save_png(image, folder / f"scene{scene_index + 1:02d}_s{s:.2f}.png"))
    captions = [("base (0)" if s == 0 else f"strength {s:g}") for s in strengths]
    path = save_figure(grid_figure(files, captions, title=f"scene {scene_index + 1:02d} · seed {scene.seed}",
                                   cols=len(files)), cfg.storyboard_dir / SWEEP_NAME)
    write_json({"scene_index": scene_index, "prompt": prompt, "seed": scene.seed, **vars(settings),
                "lora": _lora_info(lora, 1.0) | {"strength": None}, "strengths": strengths,
                "files": [f.name for f in files], "base_model": _base_model_info(cfg, renderer.root),
                "device": renderer.device, "dtype": dtype_name(renderer.dtype)}, folder / "sweep.json")
    return path


# ---------------------------------------------------------------- one prompt


@dataclass
class RenderResult:
    """What `render` wrote: one image per (strength, seed), their grid and render.json."""

    folder: Path
    images: list[Image.Image]
    files: list[Path]
    grid: Path
    prompt: str
    strengths: list[float]
    seeds: list[int]


def _render_name(prompt: str) -> str:
    """A folder name for a prompt: the same prompt always lands in the same folder."""
    import hashlib

    return "prompt-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:10]


@logged_step("04_storyboard")
def render(cfg: Config, prompt: str, strengths: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
           *, lora_path: str | Path | None = None, negative: str | None = None, steps: int | None = None,
           width: int | None = None, height: int | None = None, cfg_scale: float | None = None,
           name: str | None = None, progress: bool = True,
           on_step: Callable[[SamplerStep, Any], None] | None = None) -> RenderResult:
    """One prompt at each strength (default generate.strength) x seed (default cfg.seed), with the LoRA.

    `on_step` (a kolors.renderer.SamplerSteps, say) sees every denoising step of every image.

    Settings not given come from the story file (negative, cfg_scale) and the profile (steps, size),
    as for the storyboard. Writes cfg.renders_dir/NAME/ (default name: from the prompt's hash):
    s<strength>_seed<seed>.png, grid.png (a row per strength) and render.json; returns the images too.
    """
    from kolors_lib.core.console import progress as tqdm

    prompt = prompt.strip() if isinstance(prompt, str) else ""
    if not prompt:
        raise StoryError("render needs a non-empty prompt")
    settings = render_settings(cfg, load_story(cfg.generate.story, count_notice=False))
    strengths = [checked_strength(s) for s in ([cfg.generate.strength] if strengths is None else strengths)]
    seeds = [checked_seed(s) for s in ([cfg.seed] if seeds is None else seeds)]
    if not strengths or not seeds:
        raise ConfigError("render needs at least one strength and one seed")
    if name is not None:
        output_name(name, "render name")
    width = image_side(width or settings.width, "width")
    height = image_side(height or settings.height, "height")
    negative = settings.negative if negative is None else negative
    steps = settings.steps if steps is None else integer(steps, "steps")
    cfg_scale = settings.cfg_scale if cfg_scale is None else cfg_scale
    prompt = with_trigger(prompt, trigger_word(cfg))
    folder = cfg.renders_dir / (name or _render_name(prompt))
    lora, renderer = prepare_renderer(cfg, lora_path, [prompt], [negative])
    merger = LoraMerger(renderer.unet, lora, keep_base=len(strengths) > 1)
    images, files, captions = [], [], []
    for strength, seed in tqdm([(a, b) for a in strengths for b in seeds], desc="images", disable=not progress):
        if merger.strength != strength:  # a fresh merger is the base model (strength 0)
            merger.set(strength)
        images.append(renderer.render(prompt, negative, seed, steps, cfg_scale, width, height, on_step=on_step))
        files.append(save_png(images[-1], folder / f"s{strength:.2f}_seed{seed}.png"))
        captions.append(f"strength {strength:g} · seed {seed}")
    grid = save_figure(grid_figure(files, captions, title=name or "", cols=len(seeds)), folder / "grid.png")
    write_json({"prompt": prompt, "negative": negative, "steps": steps, "cfg_scale": cfg_scale, "width": width,
                "height": height, "strengths": strengths, "seeds": seeds, "files": [f.name for f in files],
                "lora": _lora_info(lora, 1.0) | {"strength": None}, "base_model": _base_model_info(cfg, renderer.root),
                "device": renderer.device, "dtype": dtype_name(renderer.dtype)}, folder / "render.json")
    return RenderResult(folder, images, files, grid, prompt, strengths, seeds)


# ---------------------------------------------------------------- img2img: draft small, refine large


def _round_size(value: int) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


@logged_step("04_storyboard")
def refine(cfg: Config, image_path: str | Path, prompt: str, denoise: float = 0.5, *, width: int | None = None,
           height: int | None = None, seed: int | None = None, steps: int | None = None,
           strength: float | None = None, lora_path: str | Path | None = None, negative: str | None = None,
           cfg_scale: float | None = None, out_path: str | Path | None = None,
           on_step: Callable[[SamplerStep, Any], None] | None = None) -> Path:
    """img2img: re-render `image_path` (a small draft, or any picture to restyle) with Kolors + LoRA.

    The picture is resized to width x height (default: its own size rounded to multiples of 64),
    VAE-encoded, noised to `denoise` (0 keeps it, 1 ignores it) and denoised by the stock pipeline
    (`input_image` + `denoising_strength`). Returns the written PNG (default
    storyboard_dir/refined/<name>_refined.png). `on_step`: as for `render`.
    """
    from PIL import Image, ImageOps

    if not 0.0 <= float(denoise) <= 1.0:
        raise ConfigError(f"denoise must be in [0, 1], not {denoise!r}: 0 keeps the panel, 1 redraws it")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise MissingInputError(f"image not found: {image_path}: give the path of a picture to refine")
    story = load_story(cfg.generate.story, count_notice=False)  # only its settings are used
    settings = render_settings(cfg, story)
    with Image.open(image_path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    width = image_side(_round_size(width or img.width), "width")  # bounded like every render (MAX_SIDE)
    height = image_side(_round_size(height or img.height), "height")
    if (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    prompt = with_trigger(prompt.strip(), trigger_word(cfg))
    negative = settings.negative if negative is None else negative
    strength = checked_strength(cfg.generate.strength if strength is None else strength)
    seed = checked_seed(cfg.seed if seed is None else seed)
    steps = settings.steps if steps is None else integer(steps, "steps")
    lora, renderer = prepare_renderer(cfg, lora_path, [prompt], [negative])
    LoraMerger(renderer.unet, lora).set(strength)
    result = renderer.render(prompt, negative, seed, steps,
                             settings.cfg_scale if cfg_scale is None else cfg_scale, width, height,
                             input_image=img, denoising_strength=float(denoise), on_step=on_step)
    out = Path(out_path) if out_path else cfg.storyboard_dir / "refined" / f"{image_path.stem}_refined.png"
    return save_png(result, out)


__all__ = ["RenderResult", "StoryboardResult", "refine", "render", "render_storyboard", "reproduce", "strength_sweep"]
