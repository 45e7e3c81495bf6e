"""The toy Kolors: the tiny Kolors layout whose VAE and UNet are trained on the toy world, so it draws.

Same classes, files and loading code as the real model; the text encoder is the tiny random ChatGLM,
frozen. The VAE learns the world's pictures first; then the UNet learns to denoise their latents under
ChatGLM's embeddings of their captions, through the course's own denoising loss (every weight
trainable instead of a LoRA). Deterministic from the seed; written once per machine.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

# The toy's sizes: the real 46-block layout with one transformer layer per attention block (the real
# model has 1/2/10): the per-call cost of thousands of small modules is what bounds CPU training.
TOY_UNET = {
    "block_out_channels": [32, 64, 96],
    "attention_head_dim": [1, 2, 3],
    "transformer_layers_per_block": [1, 1, 1],
    "cross_attention_dim": 64,
    "encoder_hid_dim": 64,
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 64 + 6 * 32,
    "sample_size": 8,
}
TOY_VAE = {"block_out_channels": [32, 32, 64, 64], "sample_size": 64}
RESOLUTION = 64  # 8x8 latents: only there does a few-thousand-step run fit in minutes on 2 cores
PREFIXES = ("", "kstory，", "古风，水墨画，", "kstory，古风，水墨画，")  # what step 03/04 put before a scene
RECIPE = {"pictures": 4096, "vae_steps": 400, "vae_batch": 16, "vae_lr": 2e-3,
          "unet_steps": 2500, "unet_batch": 32, "unet_lr": 1e-3, "uncond": 0.1}


def _pictures(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    from kolors_lib.offline_models.toy_world import samples

    drawn = samples(count, RESOLUTION, seed)
    pixels = np.stack([np.asarray(img, dtype=np.float32) for img, _ in drawn]) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for _, s in drawn]


def _crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random `size` crop per picture: the VAE is convolutional, and full-size steps cost 4x more."""
    top, left = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=g))
    return x[..., top:top + size, left:left + size]


def train_vae(encoder: torch.nn.Module, decoder: torch.nn.Module, pixels: torch.Tensor, steps: int,
              batch: int, lr: float, seed: int, bar: Any = None, crop: int = 32) -> float:
    """Autoencoder training: reconstruct the pictures through noisy latents held near N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    encoder.train(), decoder.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x = _crops(pixels[torch.randint(0, len(pixels), (batch,), generator=g)], crop, g)
        z = encoder(x)
        # noise on the latents: the decoder must tolerate what an imperfect UNet hands it
        noisy = z + 0.1 * torch.randn(z.shape, generator=g)
        loss = torch.nn.functional.mse_loss(decoder(noisy), x) + 1e-3 * z.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update(1)
    return float(loss)


def unit_latent_scale(encoder: torch.nn.Module, decoder: torch.nn.Module, pixels: torch.Tensor) -> float:
    """Rescale latents to std 1 (as the real VAE's scaled latents) without changing any reconstruction."""
    with torch.no_grad():
        std = float(encoder(pixels[:256]).std())
        encoder.quant_conv.weight[:4] /= std
        encoder.quant_conv.bias[:4] /= std
        decoder.post_quant_conv.weight *= std
    return std


def train_unet(unet: torch.nn.Module, latents: torch.Tensor, texts: dict[str, torch.Tensor], steps: int,
               batch: int, lr: float, seed: int, bar: Any = None) -> list[float]:
    """Every UNet weight trained on the course's denoising loss, one random timestep per sample."""
    from kolors_lib.lora_module import KolorsLoraModule
    from kolors_lib.settings import LoraConfig

    unet.requires_grad_(True)
    module = KolorsLoraModule(unet, LoraConfig(rank=1, alpha=1.0, target_modules=()), lr,
                              gradient_checkpointing=False, seed=seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    timesteps = module.scheduler.timesteps
    losses = []
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = timesteps[torch.randint(0, len(timesteps), (batch,), generator=g)]
        loss = module.denoising_loss(latents[idx], noise, t, {k: v[idx] for k, v in texts.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return losses


def toy_config(kind: str, base: dict[str, Any]) -> dict[str, Any]:
    """The real config of `kind` with the toy's sizes."""
    return {**copy.deepcopy(base), **(TOY_UNET if kind == "unet" else TOY_VAE)}


def timed(label: str, t0: float) -> None:
    print(f"{label}: {time.time() - t0:.0f} s", flush=True)


__all__ = ["PREFIXES", "RECIPE", "RESOLUTION", "TOY_UNET", "TOY_VAE", "train_unet", "train_vae",
           "unit_latent_scale"]
_ = Path


def diffusers_names(model: torch.nn.Module, diffusers_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """DiffSynth name -> (diffusers name, shape), found by running DiffSynth's own converter on labelled tensors."""
    labelled = {name: torch.full(shape, float(i), dtype=torch.float64) for i, (name, shape) in
                enumerate(diffusers_shapes.items())}
    converted = model.state_dict_converter().from_diffusers(labelled)
    converted = converted[0] if isinstance(converted, tuple) else converted
    names = list(diffusers_shapes)
    return {k: (names[int(v.flatten()[0])], diffusers_shapes[names[int(v.flatten()[0])]]) for k, v in converted.items()}


def diffusers_shapes(cls_name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of diffusers' own model for `config`, built on the meta device (no memory)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_as_diffusers(models: list[torch.nn.Module], shapes: dict[str, tuple[int, ...]], dest: Path,
                      dtype: torch.dtype) -> None:
    """Write DiffSynth models' weights under diffusers' names and shapes (`shapes`), atomically."""
    from safetensors.torch import save_file

    from kolors_lib.files import atomic_path

    state: dict[str, torch.Tensor] = {}
    for model in models:
        weights = model.state_dict()
        for name, (key, shape) in diffusers_names(model, shapes).items():
            if name in weights:  # DiffSynth's encoder converter also names the decoder's weights
                state[key] = weights[name].detach().reshape(shape).to(dtype).contiguous()
    missing = set(shapes) - set(state)
    if missing:
        raise RuntimeError(f"no DiffSynth weight for {sorted(missing)[:3]}")
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
