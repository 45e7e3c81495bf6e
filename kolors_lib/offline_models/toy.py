"""The toy Kolors: the tiny Kolors layout whose VAE and UNet are trained on the toy world, so it draws.

Same classes, files and loading code as the real model; the text encoder is the tiny random ChatGLM,
frozen. The VAE learns the world's pictures first; then the UNet learns to denoise their latents under
ChatGLM's embeddings of their captions, through the one denoising loss of step 03
(kolors_lib.train.denoise) with every weight trainable instead of a LoRA. Deterministic from the seed;
trained once per machine and kept in a folder keyed by TOY_VERSION and the seed.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kolors_lib.core.console import progress, show
from kolors_lib.core.files import save_safetensors, staged_folder, write_json
from kolors_lib.data.toy_world import samples
from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG, sized_class
from kolors_lib.offline_models.tiny import TINY_UNET, TINY_VAE, write_tiny_kolors
from kolors_lib.train.denoise import denoising_loss, make_scheduler

TOY_VERSION = 2  # bump when the world, the sizes or the recipe change: a kept toy model is then retrained
# The real 46-block layout with one transformer layer per attention block (the real model has 1/2/10):
# the per-call cost of thousands of small modules is what bounds training on CPU. 64 channels at the top
# level: GroupNorm has 32 groups, and with one channel per group (tiny's 32) each channel is normalised on
# its own, which erases a flat picture's colour (measured: a VAE with 32 keeps the colour of 19 % of pictures).
TOY_UNET = {**TINY_UNET, "block_out_channels": [64, 64, 128], "attention_head_dim": [1, 2, 4],
            "transformer_layers_per_block": [1, 1, 1], "sample_size": 8}
TOY_VAE = {**TINY_VAE, "block_out_channels": [64, 64, 64, 64], "sample_size": 64}
RESOLUTION = 64  # 8x8 latents: only there does a few-thousand-step run fit in minutes on 2 cores
# what steps 02-04 put before a scene: the trigger word (", " as kolors.story.with_trigger) and the style;
# step 02 also rewrites a caption's "，" as ", " (clean.recipe.build_caption): both forms are trained
PREFIXES = ("", "kstory, ", "古风，水墨画，", "kstory, 古风，水墨画，")
FORMS = ("，", ", ")
RECIPE = {"pictures": 4096, "vae_ink": 0.125, "vae_steps": 500, "vae_batch": 16, "vae_crop": 32, "vae_lr": 1.5e-3,
          "unet_steps": 575, "unet_batch": 128, "unet_lr": 2e-3, "uncond": 0.1, "noise_offset": 0.15,
          "noisy_half": 0.5}
MINUTES = 10  # the notice: 587 s measured on 2 quiet cores (2026-12-07, RECIPE as above)
Loader = Callable[[list[Path]], Any]  # kolors.models.load_model_manager: the one loading path


def toy_home() -> Path:
    """Where toy models are kept for every work dir of this machine: $KOLORS_TOY_HOME or ~/.cache."""
    return Path(os.environ.get("KOLORS_TOY_HOME") or Path.home() / ".cache" / "kolors-course" / "toy")


def toy_info(seed: int) -> dict[str, Any]:
    """What the toy set's marker records: a kept set with other content is retrained."""
    return {"version": TOY_VERSION, "seed": seed, "unet": TOY_UNET, "vae": TOY_VAE, "recipe": RECIPE,
            "resolution": RESOLUTION, "prefixes": list(PREFIXES), "forms": list(FORMS)}


def _pictures(count: int, seed: int, ink: bool = False) -> tuple[torch.Tensor, list[str]]:
    drawn = samples(count, RESOLUTION, seed, ink=ink)
    pixels = np.stack([np.asarray(img, dtype=np.float32) for img, _ in drawn]) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for _, s in drawn]


def _crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random `size` crop for the batch: the VAE is convolutional, and full-size steps cost 4x more."""
    top, left = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., top:top + size, left:left + size]


def train_vae(encoder: torch.nn.Module, decoder: torch.nn.Module, pixels: torch.Tensor, seed: int,
              bar: Any = None) -> float:
    """Autoencoder training: reconstruct the pictures through latents kept small (rescaled to std 1 after)."""
    r = RECIPE
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *decoder.parameters()], lr=r["vae_lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, r["vae_lr"], total_steps=r["vae_steps"], pct_start=0.1)
    encoder.train(), decoder.train()
    loss = torch.zeros(())
    for _ in range(r["vae_steps"]):
        x = _crops(pixels[torch.randint(0, len(pixels), (r["vae_batch"],), generator=g)], r["vae_crop"], g)
        z = encoder(x)
        loss = torch.nn.functional.mse_loss(decoder(z), x) + 1e-3 * z.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update(1)
    return float(loss.detach())


def unit_latent_scale(encoder: torch.nn.Module, decoder: torch.nn.Module, pixels: torch.Tensor) -> float:
    """Rescale latents to std 1 (as the real VAE's scaled latents) without changing any reconstruction."""
    with torch.no_grad():
        std = float(encoder(pixels[:256]).std())
        encoder.quant_conv.weight[:4] /= std
        encoder.quant_conv.bias[:4] /= std
        decoder.post_quant_conv.weight *= std
    return std


def _prompt_rows(captions: list[str], count: int, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per step and sample, which prompt row: a random prefix of PREFIXES, or the empty prompt (CFG)."""
    names = sorted(set(captions))
    caption_id = torch.tensor([names.index(c) for c in captions])
    g = torch.Generator().manual_seed(seed)

    def rows(idx: torch.Tensor) -> torch.Tensor:
        variant = torch.randint(0, len(PREFIXES) * len(FORMS), (len(idx),), generator=g)
        drop = torch.rand(len(idx), generator=g) < RECIPE["uncond"]
        return torch.where(drop, count - 1, variant * len(names) + caption_id[idx])
    return rows


def prompt_table(captions: list[str]) -> list[str]:
    """Every prompt the UNet trains on, row by row: (prefix, comma form) x caption, then the empty prompt."""
    return [p + c.replace("，", f) for p in PREFIXES for f in FORMS for c in sorted(set(captions))] + [""]


def train_unet(unet: torch.nn.Module, latents: torch.Tensor, captions: list[str],
               table: dict[str, torch.Tensor], seed: int, bar: Any = None) -> list[float]:
    """Every UNet weight trained on the one denoising loss, one random timestep per sample."""
    r = RECIPE
    unet.requires_grad_(True).train()
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=r["unet_lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, r["unet_lr"], total_steps=r["unet_steps"],
                                                   pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    rows = _prompt_rows(captions, len(table["add_text_embeds"]), seed + 1)
    losses: list[float] = []
    for _ in range(r["unet_steps"]):
        idx = torch.randint(0, len(latents), (r["unet_batch"],), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        # offset noise: a random shift per picture and channel, so the UNet cannot read the ground's colour
        # from the faint signal left at t = 1099 (sqrt(alpha_bar) = 0.034), which pure noise lacks at sampling
        noise = noise + r["noise_offset"] * torch.randn((*noise.shape[:2], 1, 1), generator=g)
        # half the samples at the noisier 60 % of timesteps (timesteps run 1099 -> 0): there the picture's
        # colour and shape are decided, which is what a few CPU-minutes must teach first
        pick = torch.randint(0, len(scheduler.timesteps), (len(idx),), generator=g)
        noisy = torch.randint(0, int(0.6 * len(scheduler.timesteps)), (len(idx),), generator=g)
        t = scheduler.timesteps[torch.where(torch.rand(len(idx), generator=g) < r["noisy_half"], noisy, pick)]
        row = rows(idx)
        loss = denoising_loss(unet, scheduler, latents[idx], noise, t, {k: v[row] for k, v in table.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return losses


def encode_prompts(load: Loader, text_encoder: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """ChatGLM's embeddings of `prompts` by DiffSynth's own encode_prompt, stacked row by row."""
    from diffsynth import SDXLImagePipeline

    pipe = SDXLImagePipeline.from_model_manager(load([text_encoder]))
    with torch.no_grad():
        encoded = [type(pipe).encode_prompt(pipe, p, clip_skip=1, clip_skip_2=2, positive=True) for p in prompts]
    return {k: torch.cat([e[k] for e in encoded]).float() for k in ("encoder_hidden_states", "add_text_embeds")}


def diffusers_shapes(cls_name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of diffusers' own model for `config`, built on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def diffusers_names(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """DiffSynth name -> diffusers name, found by running DiffSynth's own converter on labelled tensors."""
    labelled = {name: torch.full(shape, float(i), dtype=torch.float64)
                for i, (name, shape) in enumerate(shapes.items())}
    converted = model.state_dict_converter().from_diffusers(labelled)
    converted = converted[0] if isinstance(converted, tuple) else converted
    names = list(shapes)
    return {k: names[int(v.flatten()[0])] for k, v in converted.items()}


def save_as_diffusers(models: list[torch.nn.Module], shapes: dict[str, tuple[int, ...]], dest: Path,
                      dtype: torch.dtype) -> None:
    """Write DiffSynth models' weights under diffusers' names and shapes (`shapes`), atomically."""
    state: dict[str, torch.Tensor] = {}
    for model in models:
        weights = model.state_dict()
        for name, key in diffusers_names(model, shapes).items():
            if name in weights:  # a converter may also name the other half's weights (encoder/decoder)
                state[key] = weights[name].detach().reshape(shapes[key]).to(dtype).contiguous()
    missing = set(shapes) - set(state)
    if missing:
        raise RuntimeError(f"no DiffSynth weight for {sorted(missing)[:3]}")
    save_safetensors(state, dest, metadata={"format": "pt"})


def _train_vae_into(folders: list[Path], pixels: torch.Tensor, seed: int, bar: Any) -> torch.nn.Module:
    cfg = {**copy.deepcopy(SDXL_VAE_CONFIG), **TOY_VAE}
    torch.manual_seed(seed)
    encoder, decoder = sized_class("vae_encoder", cfg)(), sized_class("vae_decoder", cfg)()
    train_vae(encoder, decoder, pixels, seed, bar)
    unit_latent_scale(encoder, decoder, pixels)
    shapes = diffusers_shapes("AutoencoderKL", cfg)
    for folder in folders:
        save_as_diffusers([encoder, decoder], shapes, folder / "diffusion_pytorch_model.safetensors", torch.float32)
        write_json(cfg, folder / "config.json")
    return encoder.eval()


def _train_unet_into(folder: Path, latents: torch.Tensor, captions: list[str], table: dict[str, torch.Tensor],
                     seed: int, bar: Any) -> None:
    cfg = {**copy.deepcopy(KOLORS_UNET_CONFIG), **TOY_UNET}
    torch.manual_seed(seed)
    unet = sized_class("unet", cfg)()
    train_unet(unet, latents, captions, table, seed, bar)
    shapes = diffusers_shapes("UNet2DConditionModel", cfg)
    save_as_diffusers([unet], shapes, folder / "diffusion_pytorch_model.fp16.safetensors", torch.float16)
    write_json(cfg, folder / "config.json")


def _train_into(root: Path, seed: int, load: Loader) -> None:
    """Train the VAE, then the UNet, over the random tiny set in `root`."""
    r = RECIPE
    pixels, captions = _pictures(r["pictures"], seed)
    kolors = root / "Kolors"
    # the VAE is the model's eye for every look, as the real one is: it also learns the 水墨 pictures, or no
    # LoRA could draw them (measured: a VAE of flat pictures only decodes an ink picture as orange on yellow)
    ink, _ = _pictures(int(r["pictures"] * r["vae_ink"]), seed + 7, ink=True)
    # one bar per phase: a UNet step costs about twice a VAE step, so one bar over both would mislead its ETA
    with progress(total=r["vae_steps"], desc="toy Kolors 1/2: VAE", unit="step", mininterval=2) as bar:
        encoder = _train_vae_into([kolors / "vae", root / "sdxl-vae-fp16-fix"], torch.cat([pixels, ink]), seed + 1,
                                  bar)
    with torch.no_grad():
        latents = torch.cat([encoder(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    table = encode_prompts(load, kolors / "text_encoder", prompt_table(captions))
    with progress(total=r["unet_steps"], desc="toy Kolors 2/2: UNet", unit="step", mininterval=2) as bar:
        _train_unet_into(kolors / "unet", latents, captions, table, seed, bar)


def write_toy_kolors(dest: str | Path, load: Loader, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Train the toy Kolors once (a one-line notice, a progress bar) and keep it under `dest`; return its dirs."""
    dest = Path(dest)
    out = {"kolors": dest / "Kolors", "vae_fp16_fix": dest / "sdxl-vae-fp16-fix",
           "aesthetic": dest / "aesthetics-predictor", "captioner": dest / "Qwen2-VL-2B-Instruct"}
    marker = dest / "toy-kolors.json"
    if marker.exists() and not overwrite and _read(marker) == toy_info(seed):
        return out
    # show(): the notice reaches the learner even from inside a step's log (notebook 02 may train it first)
    show(f"training the toy Kolors once: ~{MINUTES} min on 2 cores (kept in {dest})")
    start = time.monotonic()
    with staged_folder(dest) as tmp:
        write_tiny_kolors(tmp / "random", seed=seed)  # ChatGLM, predictor, captioner stay random
        for item in (tmp / "random").iterdir():
            if item.name != "tiny-kolors.json":
                shutil.move(str(item), str(tmp / item.name))
        shutil.rmtree(tmp / "random")
        # one thread per core: under load, OpenMP threads waiting on each other cost more than they give
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(min(threads, 2))
            _train_into(tmp, seed, load)
        finally:
            torch.set_num_threads(threads)
        write_json({**toy_info(seed), "seconds": round(time.monotonic() - start)}, tmp / marker.name)
    return out


def _read(marker: Path) -> dict[str, Any]:
    import json

    info = json.loads(marker.read_text())
    info.pop("seconds", None)
    return info


def toy_models(dest: str | Path, load: Loader, seed: int) -> dict[str, Path]:
    """The toy set in `dest` (a work dir's models/toy): copied from the machine's kept set, trained first if needed."""
    kept = write_toy_kolors(toy_home() / f"v{TOY_VERSION}-seed{seed}", load, seed)
    dest = Path(dest)
    marker = dest / "toy-kolors.json"
    if not (marker.exists() and _read(marker) == toy_info(seed)):
        with staged_folder(dest) as tmp:
            for item in kept.values():
                shutil.copytree(item, tmp / item.name)
            shutil.copy2(kept["kolors"].parent / marker.name, tmp / marker.name)
    return {key: dest / path.name for key, path in kept.items()}
