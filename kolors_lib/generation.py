"""Step 04: render the 8-panel storyboard with Kolors + the trained LoRA (DiffSynth 1.1.9).

How a storyboard is rendered (`render_storyboard`):

1. The story file is read and validated (8 scenes, prompts, seeds, sizes) before any model loads.
2. The LoRA file is read (a missing file says to run step 03) and checked against the UNet: a LoRA
   that does not fit fails before anything is encoded or denoised.
3. Kolors is loaded from the profile and the LoRA merged at `strength` (1.0 = the training scale
   alpha/rank, see :mod:`kolors_lib.export`).
4. **Phase 1, text:** ChatGLM encodes the 8 prompts and the negative prompt, once each. Then it is
   released (moved off the GPU, its references dropped, the CUDA cache emptied), so the GPU holds
   ChatGLM (11.6 GiB fp16) *or* UNet + VAE (4.9 GiB), never both: peak = max of the phases, not the sum.
   With a CUDA device the models are loaded on the CPU and each phase moves only what it needs.
5. **Phase 2, pixels:** every panel is rendered by DiffSynth's own `SDXLImagePipeline.__call__`
   (scheduler, CFG, add_time_ids, seeded latents, VAE decode: all stock) whose `encode_prompt` is
   replaced by a look-up in the phase-1 embeddings. Same seed -> same pixels as a plain pipeline call.

Outputs in `cfg.storyboard_dir`: panel_01.png .. panel_08.png, storyboard.png (2x4 grid with
captions) and manifest.json (everything needed to re-render a panel, see `reproduce`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_lib.checks import finite, image_side
from kolors_lib.config import GRID_FILE, LORA_FILE, MANIFEST_FILE, Config, panel_file
from kolors_lib.console import logged_step
from kolors_lib.devices import resolve_device
from kolors_lib.errors import LoraNotFoundError, MissingInputError, StoryError
from kolors_lib.files import atomic_path, save_safetensors, sha256_file, write_json
from kolors_lib.lock import one_writer
from kolors_lib.plan import Placement, device_plan, to_int8
from kolors_lib.story import (
    SIZE_MULTIPLE,
    RenderSettings,
    Scene,
    Story,
    load_story,
    render_settings,
    with_trigger,
)
from kolors_lib.viz import find_cjk_font

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

    from kolors_lib.export import LoraSpec

MANIFEST_NAME = MANIFEST_FILE
GRID_NAME = GRID_FILE
SWEEP_NAME = "sweep.png"
LORA_NAME = LORA_FILE  # what step 03 writes into cfg.lora_dir
MANIFEST_VERSION = 1
# families that carry Chinese glyphs; any installed font with every glyph needed is accepted too


# ---------------------------------------------------------------- small helpers


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def default_dtype(device: str) -> torch.dtype:
    """fp16 on a GPU (DiffSynth's VAE decoder upcasts itself), fp32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _quiet(items: Any) -> Any:
    """A progress_bar_cmd for DiffSynth that shows nothing (the panel bar is ours)."""
    return items


# ---------------------------------------------------------------- LoRA


def default_lora_path(cfg: Config) -> Path:
    """Where step 03 writes the trained LoRA."""
    return cfg.lora_path


def read_lora(path: str | Path, cfg: Config | None = None, alpha: float | None = None) -> LoraSpec:
    """Parse a LoRA file once; a missing file names the step that makes it. alpha: file metadata, else cfg.lora."""
    from kolors_lib.export import read_lora_spec

    path = Path(path)
    if not path.is_file():
        workdir = f" --workdir {cfg.workdir}" if cfg is not None else ""
        raise LoraNotFoundError(f"LoRA file not found: {path}; train it first with step 03: "
                                f"python -m kolors_lib train{workdir}")
    return read_lora_spec(path, alpha, cfg.lora.alpha if cfg is not None else None)


def check_lora_against(root: Path, lora: LoraSpec) -> None:
    """Raise LoraMismatchError naming keys when `lora` does not fit the UNet in `root` (weights not loaded)."""
    from kolors_lib.export import check_lora_fits
    from kolors_lib.models import KolorsPaths, unet_skeleton

    check_lora_fits(unet_skeleton(KolorsPaths.from_root(root).unet), lora.pairs)


def checked_strength(value: Any) -> float:
    """A LoRA strength: finite (NaN would render black panels); a negative one works but gets a notice."""
    strength = finite(value, "strength")
    if strength < 0:
        print(f"NOTICE: strength {strength:g} is negative: the LoRA's style is subtracted, not added",
              file=sys.stderr)
    return strength


class LoraMerger:
    """Merges a LoRA into a UNet at a strength; `set(s)` again restores the base first (for sweeps)."""

    def __init__(self, unet: torch.nn.Module, lora: LoraSpec, keep_base: bool = False) -> None:
        from kolors_lib.export import check_lora_fits

        self.unet, self.lora = unet, lora
        self.pairs = lora.pairs
        check_lora_fits(unet, self.pairs)  # raises LoraMismatchError naming keys, before any denoising
        params = dict(unet.named_parameters())
        self._base = ({m: params[f"{m}.weight"].detach().to("cpu", copy=True) for m in self.pairs}
                      if keep_base else None)
        self.strength = 0.0

    def set(self, strength: float) -> None:
        """W = W_base + strength·(alpha/rank)·B·A, exactly as export.merge_lora computes it."""
        from kolors_lib.export import merge_pairs

        if self.strength != 0.0:
            if self._base is None:
                raise RuntimeError("LoraMerger(keep_base=False) merges once; build it with keep_base=True")
            params = dict(self.unet.named_parameters())
            with torch.no_grad():
                for module, weight in self._base.items():
                    params[f"{module}.weight"].copy_(weight)
        if strength != 0.0:
            merge_pairs(self.unet, self.pairs, strength)
        self.strength = float(strength)


# ---------------------------------------------------------------- the two-phase renderer


@contextlib.contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """Hide transformers' "Loading checkpoint shards" bar while models load (restored after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _peak_reset(device: str) -> None:
    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if _cuda(device) else None


class KolorsRenderer:
    """DiffSynth's Kolors pipeline run in two phases: encode every prompt, release ChatGLM, denoise.

    `encode()` fills a prompt -> embeddings cache; `render()` calls the stock
    `SDXLImagePipeline.__call__` with `encode_prompt` answered from that cache, so the denoising
    is DiffSynth's own code and ChatGLM is never called (nor needed in memory) while it runs.
    """

    def __init__(self, root: Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 offload_text_encoder: bool = True, text: Placement | None = None, tiled: bool = False,
                 prompt_cache: Path | None = None) -> None:
        from kolors_lib.compat import patch_torchvision
        from kolors_lib.models import KolorsPaths, load_model_manager

        patch_torchvision()
        from diffsynth import SDXLImagePipeline

        self.root = Path(root)
        self.device = device
        self.dtype = dtype or default_dtype(device)
        self.offload = offload_text_encoder
        # offloaded, ChatGLM may sit elsewhere than the UNet (the CPU, or int8 on a small GPU)
        self.text = text if offload_text_encoder else None
        self.text_device = self.text.device if self.text else device
        self.text_dtype = self.text.torch_dtype if self.text else self.dtype
        self.tiled = tiled
        self.paths = KolorsPaths.from_root(self.root)
        # offloading: ChatGLM loads only when a prompt is missing from the cache, and the UNet and VAE
        # only after it is released, so neither host RAM nor GPU memory ever holds both; on a GPU
        # each phase loads on the CPU, then moves over
        self.load_device = "cpu" if offload_text_encoder and _cuda(device) else device
        files = [] if offload_text_encoder else [self.paths.text_encoder, self.paths.unet, self.paths.vae]
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _no_transformers_bars():  # DiffSynth prints lines per model
            self.manager = load_model_manager(files, device=self.load_device, dtype=self.text_dtype)
            self.pipe = SDXLImagePipeline.from_model_manager(self.manager, device=device)
            self.pipe.torch_dtype = self.dtype  # latents in the UNet's dtype, whatever ChatGLM's is
        self.load_log = log.getvalue()
        if offload_text_encoder:
            from kolors_lib.architecture import kolors_scheduler

            self.pipe.scheduler = kolors_scheduler()  # what DiffSynth switches to when it sees ChatGLM
        elif self.pipe.text_encoder_kolors is None:
            raise RuntimeError(f"{self.root}: DiffSynth found no Kolors ChatGLM there")
        self.cache: dict[tuple[str, bool, int, int], dict[str, torch.Tensor]] = {}
        self.prompt_cache = Path(prompt_cache) if prompt_cache else None
        self.text_id = ""  # ChatGLM's identity, read when the prompt cache is first used
        self.can_encode, self.text_encoder_released = True, False
        self.encoded, self.from_cache = 0, 0  # prompts run through ChatGLM / read from the prompt cache
        self.peak_memory: dict[str, int | None] = {}
        self.pipe.encode_prompt = self._cached_prompt  # instance attribute shadows the method

    @classmethod
    def for_config(cls, cfg: Config, root: Path) -> KolorsRenderer:
        """The renderer with every model where the device plan puts it."""
        plan = device_plan(cfg)
        unet = plan.get("storyboard-denoise", "unet")
        return cls(root, unet.device, unet.torch_dtype, cfg.generate.offload_text_encoder,
                   plan.get("storyboard-encode", "text_encoder"), plan.tiled_vae, cfg.prompt_cache_dir)

    @classmethod
    def around_unet(cls, root: Path, unet: torch.nn.Module, embeddings: dict[tuple[str, bool], dict[str, torch.Tensor]],
                    device: str, tiled: bool = False) -> KolorsRenderer:
        """A renderer for a UNet already in memory (training's) with prompts encoded elsewhere (its cache).

        No ChatGLM is loaded: `embeddings` ((prompt, positive) -> encode_prompt output) answer the
        pipeline, which gets Kolors' scheduler (what DiffSynth switches to with ChatGLM) and `root`'s VAE
        (tiled when the device plan says so: `tiled`).
        """
        from diffsynth import SDXLImagePipeline

        from kolors_lib.architecture import kolors_scheduler
        from kolors_lib.models import KolorsPaths, load_model_manager

        self = cls.__new__(cls)
        self.root, self.device, self.offload = Path(root), device, True
        self.dtype = next(unet.parameters()).dtype
        self.text_device, self.text_dtype, self.tiled = device, self.dtype, tiled
        self.paths, self.load_device = KolorsPaths.from_root(self.root), device
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            self.manager = load_model_manager([self.paths.vae], device=device, dtype=self.dtype)
            self.pipe = SDXLImagePipeline.from_model_manager(self.manager, device=device)
        self.load_log = log.getvalue()
        self.pipe.scheduler, self.pipe.unet = kolors_scheduler(), unet
        self.cache = {(p, positive, 1, 2): {k: v[None].to(device, self.dtype) for k, v in e.items()}
                      for (p, positive), e in embeddings.items()}
        self.text_encoder_released, self.peak_memory = True, {}
        self.can_encode, self.prompt_cache, self.encoded, self.from_cache = False, None, 0, 0
        self.pipe.encode_prompt = self._cached_prompt
        return self

    @property
    def unet(self) -> torch.nn.Module:
        """DiffSynth's Kolors UNet (merge LoRAs here); loaded on first use when offloading."""
        self._load_denoiser()
        return self.pipe.unet

    def _load_denoiser(self) -> None:
        """Phase 2 models (UNet + VAE) into the Kolors-mode pipeline that phase 1 built."""
        if self.pipe.unet is not None:
            return
        from kolors_lib.models import load_model_manager

        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            manager = load_model_manager([self.paths.unet, self.paths.vae], device=self.load_device, dtype=self.dtype)
        self.load_log += log.getvalue()
        for name in ("unet", "vae_decoder", "vae_encoder"):
            setattr(self.pipe, name, manager.fetch_model(f"sdxl_{name}"))
        if self.pipe.unet is None:
            raise RuntimeError(f"{self.root}: DiffSynth found no Kolors UNet there")

    @property
    def scheduler_info(self) -> dict[str, Any]:
        """The scheduler DiffSynth switched to for Kolors: only values read from the live object.

        Its betas are not kept on the object, so the noise schedule is recorded by the first and last
        alphas_cumprod it computed from them (they differ for another beta_end or schedule).
        """
        s = self.pipe.scheduler
        return {"name": type(s).__name__, "num_train_timesteps": s.num_train_timesteps,
                "prediction_type": s.prediction_type,
                "alphas_cumprod_first": round(float(s.alphas_cumprod[0]), 10),
                "alphas_cumprod_last": round(float(s.alphas_cumprod[-1]), 10)}

    def _cached_prompt(self, prompt: str, clip_skip: int = 1, clip_skip_2: int = 2,
                       positive: bool = True) -> dict[str, torch.Tensor]:
        key = (prompt, bool(positive), clip_skip, clip_skip_2)
        if key not in self.cache:
            raise RuntimeError(f"prompt not encoded in phase 1 (ChatGLM is released): {prompt!r}")
        if self.text_device == self.device and self.text_dtype == self.dtype:
            return self.cache[key]
        return {k: v.to(self.device, self.dtype) for k, v in self.cache[key].items()}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negatives: Sequence[str] = ("",)) -> None:
        """Phase 1: each distinct prompt once, from the prompt cache on disk or else through ChatGLM.

        ChatGLM is loaded only when a prompt is missing from both caches, and released afterwards when
        offloading; what it encodes is written to the prompt cache, so a re-run needs no ChatGLM at all.
        """
        todo = [(p, True) for p in dict.fromkeys(prompts)] + [(n, False) for n in dict.fromkeys(negatives)]
        todo = [(p, pos) for p, pos in todo if (p, pos, 1, 2) not in self.cache and not self._read_cached(p, pos)]
        if not todo:
            return
        if not self.can_encode:
            raise RuntimeError(f"this renderer has no ChatGLM (prompts come from elsewhere); cannot encode "
                               f"{[p for p, _ in todo]!r}")
        _peak_reset(self.device)
        self._load_text_encoder()
        pipe = self.pipe
        if self.offload and _cuda(self.text_device):
            pipe.text_encoder_kolors.to(self.text_device)
        pipe.device = self.text_device  # DiffSynth puts the token ids on pipe.device
        try:
            for prompt, positive in todo:
                self.cache[(prompt, positive, 1, 2)] = _encode_one(pipe, prompt, positive)
                self._write_cached(prompt, positive)
                self.encoded += 1
        finally:
            pipe.device = self.device
        self.peak_memory["encode"] = _peak(self.device)
        if self.offload:
            self.release_text_encoder()

    def _load_text_encoder(self) -> None:
        """ChatGLM into the pipeline, where the plan puts it (offloading: only now, on first need)."""
        if self.pipe.text_encoder_kolors is not None:
            return
        from diffsynth.prompters import KolorsPrompter

        from kolors_lib.models import load_model_manager

        with _no_transformers_bars():
            manager = load_model_manager([self.paths.text_encoder], device=self.load_device, dtype=self.text_dtype)
        self.load_log += manager.load_log
        encoder = manager.fetch_model("kolors_text_encoder")
        if encoder is None:
            raise RuntimeError(f"{self.root}: DiffSynth found no Kolors ChatGLM there")
        if self.text is not None and self.text.dtype == "int8":
            to_int8(encoder, self.text.device)
        self.text_manager = manager
        self.pipe.text_encoder_kolors = encoder
        self.pipe.prompter = KolorsPrompter()
        self.pipe.prompter.fetch_models(encoder)

    def _prompt_file(self, prompt: str, positive: bool) -> Path | None:
        """Where the prompt cache keeps one encoding (keyed by prompt, ChatGLM's identity and dtype)."""
        if self.prompt_cache is None:
            return None
        from kolors_lib.encode_cache import CACHE_VERSION, content_hash, model_identity

        self.text_id = self.text_id or model_identity(self.paths.text_encoder)
        key = content_hash("prompt", CACHE_VERSION, prompt, str(positive), self.text_id, str(self.text_dtype))
        return self.prompt_cache / f"{key[:32]}.safetensors"

    def _read_cached(self, prompt: str, positive: bool) -> bool:
        """Fill the in-memory cache from the prompt cache on disk; False when it has no such entry."""
        path = self._prompt_file(prompt, positive)
        if path is None or not path.is_file():
            return False
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        self.cache[(prompt, positive, 1, 2)] = {k: v.to(self.text_device) for k, v in tensors.items()}
        self.from_cache += 1
        return True

    def _write_cached(self, prompt: str, positive: bool) -> None:
        path = self._prompt_file(prompt, positive)
        if path is not None:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.cache[(prompt, positive, 1, 2)].items()}
            save_safetensors(tensors, path, {"prompt": prompt, "positive": str(positive), "encoder": self.text_id,
                                             "dtype": str(self.text_dtype)})

    def release_text_encoder(self) -> None:
        """Take ChatGLM off the device and drop every reference to it (pipeline, prompter, managers)."""
        pipe = self.pipe
        encoder = pipe.text_encoder_kolors
        if encoder is None:
            return
        if _cuda(self.device):
            encoder.to("cpu")
        pipe.text_encoder_kolors = None
        pipe.prompter.text_encoder = None
        for manager in (self.manager, getattr(self, "text_manager", None)):
            if manager is None:
                continue
            keep = [i for i, name in enumerate(manager.model_name) if name != "kolors_text_encoder"]
            manager.model = [manager.model[i] for i in keep]
            manager.model_path = [manager.model_path[i] for i in keep]
            manager.model_name = [manager.model_name[i] for i in keep]
        self.text_manager = None
        del encoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.text_encoder_released = True

    def _to_device(self, names: Sequence[str]) -> None:
        for name in names:
            model = getattr(self.pipe, name, None)
            if model is not None:
                model.to(self.device)

    @torch.no_grad()
    def render(self, prompt: str, negative: str, seed: int, steps: int, cfg_scale: float, width: int, height: int,
               input_image: Image.Image | None = None, denoising_strength: float = 1.0) -> Image.Image:
        """Phase 2: one image by the stock pipeline call, prompts answered from the phase-1 cache."""
        self._cached_prompt(prompt, positive=True)  # fail before any work if it was not encoded
        self._cached_prompt(negative, positive=False)
        if "denoise" not in self.peak_memory:
            _peak_reset(self.device)
        self._load_denoiser()
        self._to_device(["unet", "vae_decoder"] + (["vae_encoder"] if input_image is not None else []))
        image = self.pipe(prompt, negative_prompt=negative, cfg_scale=cfg_scale, height=height, width=width,
                          num_inference_steps=steps, seed=seed, input_image=input_image,
                          denoising_strength=denoising_strength, tiled=self.tiled, progress_bar_cmd=_quiet)
        self.peak_memory["denoise"] = max(self.peak_memory.get("denoise") or 0, _peak(self.device) or 0) or None
        return image


def _encode_one(pipe: Any, prompt: str, positive: bool) -> dict[str, torch.Tensor]:
    """DiffSynth's own SDXLImagePipeline.encode_prompt (the class method, not the cache)."""
    return type(pipe).encode_prompt(pipe, prompt, clip_skip=1, clip_skip_2=2, positive=positive)


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
    from kolors_lib.pictures import image_grid

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
        return grid_figure(self.panels, panel_captions(scenes, self.font), font=self.font)


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
    from kolors_lib.models import kolors_paths

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
        "device": renderer.device, "dtype": _dtype_name(renderer.dtype),
        "offload_text_encoder": cfg.generate.offload_text_encoder,
        "trigger_word": trigger_word(cfg) or None,
        "versions": {"diffsynth": _version("diffsynth"), "torch": torch.__version__,
                     "transformers": _version("transformers")},
        **shared,
        "panels": [{"index": i, "file": p.name, "scene": s.scene, "prompt": prompt, "story_prompt": s.prompt,
                    "seed": seeds[i], "story_seed": s.seed, **shared, "sha256": sha256_file(p)}
                   for i, (p, s, prompt) in enumerate(zip(panels, story.scenes, prompts, strict=True))],
        "selection": selection.to_dict() if selection else None,
        "grid": grid.name,
        "peak_memory_bytes": renderer.peak_memory,
    }


@logged_step("04_storyboard")
@one_writer("storyboard")
def render_storyboard(cfg: Config, story_path: str | Path | None = None, strength: float | None = None,
                      lora_path: str | Path | None = None, progress: bool = True,
                      candidates: int | None = None) -> StoryboardResult:
    """Render the story's 8 panels with Kolors + LoRA; write panels, storyboard.png and manifest.json.

    candidates > 1 (default generate.candidates): best-of-N seeds per scene, see kolors_lib/selection.py.
    """
    from kolors_lib.console import progress as tqdm
    from kolors_lib.selection import choose_seeds, draft_plan

    start = time.monotonic()
    story = load_story(story_path or cfg.generate.story)  # before any model is loaded
    settings = render_settings(cfg, story)
    plan = draft_plan(cfg, settings, cfg.generate.candidates if candidates is None else candidates)
    if plan.candidates > 1 and progress:
        from kolors_lib.console import show

        show(plan.cost_line(len(story.scenes)))  # before minutes of model loading
    strength = checked_strength(cfg.generate.strength if strength is None else strength)
    prompts = [with_trigger(s.prompt, trigger_word(cfg)) for s in story.scenes]
    out = cfg.storyboard_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg.manifest_path.unlink(missing_ok=True)  # never leave a manifest describing other panels
    lora, renderer = prepare_renderer(cfg, lora_path, prompts, [settings.negative])
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

    font = find_cjk_font(story.title + "".join(s.scene for s in story.scenes))
    title = story.title if font is not None or story.title.isascii() else (story.path.stem if story.path else "")
    drawn = [Scene(s.scene, s.prompt, seed) for s, seed in zip(story.scenes, seeds, strict=True)]
    grid = save_figure(grid_figure(panels, panel_captions(drawn, font), title=title, font=font),
                       cfg.grid_path)
    manifest = _storyboard_manifest(cfg, story, settings, lora, strength, renderer, panels, prompts, grid, seeds,
                                    selection)
    manifest_path = write_json(manifest, cfg.manifest_path)
    return StoryboardResult(out, panels, grid, manifest_path, prompts, strength, time.monotonic() - start,
                            dict(renderer.peak_memory), font)


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
        raise IndexError(f"{manifest_path}: panel index {index} out of range 0..{len(panels) - 1}")
    panel = panels[index]
    info = data["lora"]
    lora = read_lora(info["file"], alpha=info["alpha"])
    if lora.sha256 != info["sha256"]:
        raise ValueError(f"{lora.path} changed since {manifest_path} was written (sha256 differs)")
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
    from kolors_lib.console import progress as tqdm

    story = load_story(story_path or cfg.generate.story)
    if not 0 <= scene_index < len(story.scenes):
        raise StoryError(f"{story.path}: scene index {scene_index} out of range 0..{len(story.scenes) - 1}")
    settings = render_settings(cfg, story)
    strengths = [finite(s, "strength") for s in (cfg.generate.sweep_strengths if strengths is None else strengths)]
    if not strengths:
        raise ValueError("strength_sweep needs at least one strength")
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
                "device": renderer.device, "dtype": _dtype_name(renderer.dtype)}, folder / "sweep.json")
    return path


# ---------------------------------------------------------------- img2img: draft small, refine large


def _round_size(value: int) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


@logged_step("04_storyboard")
def refine(cfg: Config, image_path: str | Path, prompt: str, denoise: float = 0.5, *, width: int | None = None,
           height: int | None = None, seed: int | None = None, steps: int | None = None,
           strength: float | None = None, lora_path: str | Path | None = None, negative: str | None = None,
           cfg_scale: float | None = None, out_path: str | Path | None = None) -> Path:
    """img2img: re-render `image_path` (a small draft, or any picture to restyle) with Kolors + LoRA.

    The picture is resized to width x height (default: its own size rounded to multiples of 64),
    VAE-encoded, noised to `denoise` (0 keeps it, 1 ignores it) and denoised by the stock pipeline
    (`input_image` + `denoising_strength`). Returns the written PNG (default
    storyboard_dir/refined/<name>_refined.png).
    """
    from PIL import Image, ImageOps

    if not 0.0 <= float(denoise) <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], not {denoise!r}")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise MissingInputError(f"image not found: {image_path}: give the path of a picture to refine")
    story = load_story(cfg.generate.story)
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
    lora, renderer = prepare_renderer(cfg, lora_path, [prompt], [negative])
    LoraMerger(renderer.unet, lora).set(strength)
    result = renderer.render(prompt, negative, cfg.seed if seed is None else seed, steps or settings.steps,
                             settings.cfg_scale if cfg_scale is None else cfg_scale, width, height,
                             input_image=img, denoising_strength=float(denoise))
    out = Path(out_path) if out_path else cfg.storyboard_dir / "refined" / f"{image_path.stem}_refined.png"
    return save_png(result, out)


__all__ = ["KolorsRenderer", "LoraMerger", "LoraNotFoundError", "Scene", "Story", "StoryError", "StoryboardResult",
           "find_cjk_font", "load_story", "read_lora", "refine", "render_storyboard",
           "reproduce", "strength_sweep", "with_trigger"]
