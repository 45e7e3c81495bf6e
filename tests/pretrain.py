"""A briefly pretrained tiny Kolors UNet for tests that ask whether a LoRA learns.

A random UNet cannot denoise at all, so any LoRA on it first learns the same generic correction
whatever it is shown (measured: every LoRA lowered the loss by ~0.11, on the right pictures, on grey
ones, with shuffled captions). Real LoRAs start from a model that already denoises; this gives the
tiny one that property: a few hundred steps on synthetic shapes, in diffusers' own UNet class, saved
back over the random UNet file so the course loads it through the usual path.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from kolors_lib.core.config import Config
from kolors_lib.core.settings import ModelSource
from kolors_lib.kolors.models import kolors_paths
from kolors_lib.train.cache import build_cache, load_latents, load_text
from kolors_lib.train.lora_module import add_time_ids, make_scheduler
from tests.train_sets import write_train_set

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]


def shape_picture(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """A random square or disc on a plain background, and its caption."""
    bg, fg = rng.sample(COLOURS, 2)
    shape = rng.choice(["square", "circle"])
    image = Image.new("RGB", (size, size), bg)
    x0, x1 = sorted(rng.sample(range(4, size - 4), 2))
    y0, y1 = sorted(rng.sample(range(4, size - 4), 2))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)([x0, y0, x1 + 4, y1 + 4], fill=fg)
    return image, f"a {fg} {shape} on {bg}"


def pretrain_tiny_unet(base: Config, workdir: Path, steps: int = 120, batch: int = 8, count: int = 64,
                       resolution: int = 64, lr: float = 1e-3, seed: int = 0) -> Config:
    """Copy `base`'s tiny models to `workdir`, pretrain their UNet on shapes; return a config using them."""
    cfg = _moved_models(base, workdir / "models" / "tiny")
    rng = random.Random(seed)
    pictures, captions = zip(*(shape_picture(rng, resolution) for _ in range(count)), strict=True)
    shapes = write_train_set(cfg, workdir / "shapes", list(pictures), list(captions), resolution)
    report = build_cache(shapes)
    latents = torch.stack([load_latents(report.root, s.image_key)["latents"] for s in report.samples])
    texts = [load_text(report.root, s.text_key) for s in report.samples]
    hidden = torch.stack([t["encoder_hidden_states"] for t in texts])
    pooled = torch.stack([t["add_text_embeds"] for t in texts])
    _fit_unet(kolors_paths(cfg).unet.parent, latents, hidden, pooled, steps, batch, lr, seed)
    return cfg


def _moved_models(base: Config, dest: Path) -> Config:
    """A copy of `base`'s tiny model folders at `dest`, and a config whose models point there."""
    old = base.tiny_models_dir
    shutil.copytree(old, dest)
    moved = {}
    for f in dataclasses.fields(base.models):
        source = getattr(base.models, f.name)
        if isinstance(source, ModelSource) and source.local_dir and Path(source.local_dir).is_relative_to(old):
            moved[f.name] = dataclasses.replace(source, local_dir=dest / Path(source.local_dir).relative_to(old))
    return dataclasses.replace(base, models=dataclasses.replace(base.models, **moved))


def _fit_unet(folder: Path, latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor,
              steps: int, batch: int, lr: float, seed: int) -> None:
    """Train every UNet weight on the ε-prediction loss; save over the fp16 variant file."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    scheduler, optimizer = make_scheduler(), torch.optim.AdamW(unet.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    time_ids = add_time_ids(latents[:batch]).reshape(batch, -1).float()  # the course's micro-conditioning
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        t = scheduler.timesteps[torch.randint(0, len(scheduler.timesteps), (batch,), generator=g)]
        # DiffSynth's scheduler takes one timestep per call
        noisy = torch.cat([scheduler.add_noise(x0[i:i + 1], noise[i:i + 1], t[i:i + 1]) for i in range(batch)])
        target = torch.cat([scheduler.training_target(x0[i:i + 1], noise[i:i + 1], t[i:i + 1])
                            for i in range(batch)])
        pred = unet(noisy, t, encoder_hidden_states=hidden[idx],
                    added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.to(torch.float16).save_pretrained(folder, variant="fp16")
