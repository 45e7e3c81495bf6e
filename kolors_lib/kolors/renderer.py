"""Kolors rendering shared by every step that draws: the two-phase renderer and the sampler's steps.

`KolorsRenderer` runs DiffSynth's own `SDXLImagePipeline.__call__` in two phases: ChatGLM encodes every
prompt once and is released, then the UNet + VAE denoise with `encode_prompt` answered from that cache
(see :mod:`kolors_lib.storyboard.storyboard` for the steps built on it). The LoRA goes in through
:mod:`kolors_lib.kolors.merger`.
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kolors_lib.core.config import Config
from kolors_lib.core.device_plan import Placement, device_plan
from kolors_lib.core.files import atomic_path, save_safetensors
from kolors_lib.kolors.quantize import quantize_base, quantized_share, to_int8

if TYPE_CHECKING:
    from PIL import Image

    from kolors_lib.kolors.lora import LoraSpec


# ---------------------------------------------------------------- small helpers


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def default_dtype(device: str) -> torch.dtype:
    """fp16 on a GPU (DiffSynth's VAE decoder upcasts itself), fp32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def package_version(package: str) -> str | None:
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
    from kolors_lib.core.inputs import lora_file
    from kolors_lib.kolors.lora import read_lora_spec

    return read_lora_spec(lora_file(path, cfg), alpha, cfg.lora.alpha if cfg is not None else None)


def check_lora_against(root: Path, lora: LoraSpec) -> None:
    """Raise LoraMismatchError naming keys when `lora` does not fit the UNet in `root` (weights not loaded)."""
    from kolors_lib.kolors.lora import check_lora_fits
    from kolors_lib.kolors.models import KolorsPaths, unet_skeleton

    check_lora_fits(unet_skeleton(KolorsPaths.from_root(root).unet), lora.pairs)


# ---------------------------------------------------------------- looking inside the sampler


@dataclass
class SamplerStep:
    """What the sampler had at one denoising step: its input, the UNet's noise prediction (after CFG)."""

    index: int  # 0-based step number
    timestep: int  # the training timestep this step stands for (0 .. num_train_timesteps-1, 1099 for Kolors)
    alpha_cumprod: float  # ᾱ_t of Kolors' noise schedule: latents = √ᾱ·clean + √(1-ᾱ)·noise
    latents: torch.Tensor  # x_t, the noisy latents the UNet saw
    noise_pred: torch.Tensor  # ε̂, the noise the UNet (with classifier-free guidance) saw in them


class SamplerSteps:
    """A `render(on_step=...)` callback that keeps every step's SamplerStep, and decodes latents to pictures.

    It holds the renderer's VAE (for `decode`) until it is dropped.
    """

    def __init__(self) -> None:
        self.steps: list[SamplerStep] = []
        self._decode: Callable[[torch.Tensor], Image.Image] | None = None

    def __call__(self, step: SamplerStep, decode: Callable[[torch.Tensor], Image.Image]) -> None:
        self.steps.append(step)
        self._decode = decode

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """Latents -> picture through the VAE decoder of the render that filled this collector."""
        if self._decode is None:
            raise RuntimeError("no render has called this collector yet: pass it as render(..., on_step=steps)")
        return self._decode(latents)


@contextlib.contextmanager
def _watch_steps(pipe: Any, on_step: Callable[[SamplerStep, Any], None] | None,
                 decode: Callable[[torch.Tensor], Image.Image]) -> Iterator[None]:
    """Report each call of the pipeline's scheduler.step (x_t and ε̂) to `on_step`; the step itself is unchanged."""
    if on_step is None:
        yield
        return
    scheduler = pipe.scheduler
    original = scheduler.step

    def step(model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        t = int(timestep.flatten()[0])
        on_step(SamplerStep(len(seen), t, float(scheduler.alphas_cumprod[t]), sample.detach().clone(),
                            model_output.detach().clone()), decode)
        seen.append(t)
        return original(model_output, timestep, sample, **kwargs)

    seen: list[int] = []
    scheduler.step = step  # an instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del scheduler.step


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

    base_quantization = "none"  # the UNet's int8/nf4 from the device plan (set by for_config)

    def __init__(self, root: Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 offload_text_encoder: bool = True, text: Placement | None = None, tiled: bool = False,
                 prompt_cache: Path | None = None, unet: torch.nn.Module | None = None,
                 embeddings: dict[tuple[str, bool], dict[str, torch.Tensor]] | None = None) -> None:
        """Load what phase 1 needs; with `unet` and `embeddings` (training's UNet and cached prompts), only the VAE."""
        from kolors_lib.core.compat import patch_torchvision
        from kolors_lib.kolors.models import KolorsPaths, load_model_manager

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
        if unet is not None:  # a UNet already in memory: only the VAE is missing
            offload_text_encoder, self.offload, files, self.load_device = True, True, [self.paths.vae], device
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _no_transformers_bars():  # DiffSynth prints lines per model
            self.manager = load_model_manager(files, device=self.load_device, dtype=self.text_dtype)
            self.pipe = SDXLImagePipeline.from_model_manager(self.manager, device=device)
            self.pipe.torch_dtype = self.dtype  # latents in the UNet's dtype, whatever ChatGLM's is
        self.load_log = log.getvalue()
        if offload_text_encoder:
            from kolors_lib.kolors.architecture import kolors_scheduler

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
        if unet is not None:
            self.pipe.unet = unet
            self.cache = {(p, positive, 1, 2): {k: v[None].to(device, self.dtype) for k, v in e.items()}
                          for (p, positive), e in (embeddings or {}).items()}
            self.can_encode, self.text_encoder_released, self.prompt_cache = False, True, None

    @classmethod
    def for_config(cls, cfg: Config, root: Path) -> KolorsRenderer:
        """The renderer with every model where the device plan puts it."""
        plan = device_plan(cfg)
        unet = plan.get("storyboard-denoise", "unet")
        renderer = cls(root, unet.device, unet.torch_dtype, cfg.generate.offload_text_encoder,
                       plan.get("storyboard-encode", "text_encoder"), plan.tiled_vae, cfg.prompt_cache_dir)
        renderer.base_quantization = unet.quantization
        renderer.quantize_unet()  # loaded already when ChatGLM is not offloaded
        return renderer

    @classmethod
    def around_unet(cls, root: Path, unet: torch.nn.Module, embeddings: dict[tuple[str, bool], dict[str, torch.Tensor]],
                    device: str, tiled: bool = False) -> KolorsRenderer:
        """A renderer for a UNet already in memory (training's) with prompts encoded elsewhere (its cache).

        No ChatGLM is loaded: `embeddings` ((prompt, positive) -> encode_prompt output) answer the
        pipeline, which gets Kolors' scheduler (what DiffSynth switches to with ChatGLM) and `root`'s VAE
        (tiled when the device plan says so: `tiled`).
        """
        return cls(root, device, next(unet.parameters()).dtype, tiled=tiled, unet=unet, embeddings=embeddings)

    @property
    def unet(self) -> torch.nn.Module:
        """DiffSynth's Kolors UNet (merge LoRAs here); loaded on first use when offloading."""
        self._load_denoiser()
        return self.pipe.unet

    def _load_denoiser(self) -> None:
        """Phase 2 models (UNet + VAE) into the Kolors-mode pipeline that phase 1 built."""
        if self.pipe.unet is not None:
            return
        from kolors_lib.kolors.models import load_model_manager

        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            manager = load_model_manager([self.paths.unet, self.paths.vae], device=self.load_device, dtype=self.dtype)
        self.load_log += log.getvalue()
        for name in ("unet", "vae_decoder", "vae_encoder"):
            setattr(self.pipe, name, manager.fetch_model(f"sdxl_{name}"))
        if self.pipe.unet is None:
            raise RuntimeError(f"{self.root}: DiffSynth found no Kolors UNet there")
        self.quantize_unet()

    def quantize_unet(self) -> None:
        """The UNet's linear layers in the plan's int8/nf4 (generate.base_quantization), once it is loaded."""
        unet = self.pipe.unet
        if unet is not None and self.base_quantization != "none" and not quantized_share(unet):
            quantize_base(unet, self.base_quantization, self.device)

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

        from kolors_lib.kolors.models import load_model_manager

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
        from kolors_lib.train.cache import CACHE_VERSION, content_hash, model_identity

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
    def decode(self, latents: torch.Tensor) -> Image.Image:
        """Latents -> picture by the pipeline's own VAE decoding (as at the end of a render)."""
        self._load_denoiser()
        self._to_device(["vae_decoder"])
        return self.pipe.decode_image(latents.to(self.device, self.dtype), tiled=self.tiled)

    @torch.no_grad()
    def render(self, prompt: str, negative: str, seed: int, steps: int, cfg_scale: float, width: int, height: int,
               input_image: Image.Image | None = None, denoising_strength: float = 1.0,
               on_step: Callable[[SamplerStep, Any], None] | None = None) -> Image.Image:
        """Phase 2: one image by the stock pipeline call, prompts answered from the phase-1 cache.

        `on_step` (e.g. a SamplerSteps) is called at every denoising step with a SamplerStep and a decoder.
        """
        self._cached_prompt(prompt, positive=True)  # fail before any work if it was not encoded
        self._cached_prompt(negative, positive=False)
        if "denoise" not in self.peak_memory:
            _peak_reset(self.device)
        self._load_denoiser()
        self._to_device(["unet", "vae_decoder"] + (["vae_encoder"] if input_image is not None else []))
        with _watch_steps(self.pipe, on_step, self.decode):
            image = self.pipe(prompt, negative_prompt=negative, cfg_scale=cfg_scale, height=height, width=width,
                              num_inference_steps=steps, seed=seed, input_image=input_image,
                              denoising_strength=denoising_strength, tiled=self.tiled, progress_bar_cmd=_quiet)
        self.peak_memory["denoise"] = max(self.peak_memory.get("denoise") or 0, _peak(self.device) or 0) or None
        return image


def _encode_one(pipe: Any, prompt: str, positive: bool) -> dict[str, torch.Tensor]:
    """DiffSynth's own SDXLImagePipeline.encode_prompt (the class method, not the cache)."""
    return type(pipe).encode_prompt(pipe, prompt, clip_skip=1, clip_skip_2=2, positive=positive)


__all__ = ["KolorsRenderer", "SamplerStep", "SamplerSteps", "check_lora_against",
           "default_dtype", "default_lora_path", "read_lora", "save_png"]
