"""The one denoising loss: the stock trainer's ε-prediction MSE, shared by LoRA training (step 03) and the
toy Kolors' pretraining (every UNet weight trained), so both train through the same code."""

from __future__ import annotations

from typing import Any

import torch

from kolors_lib.kolors.architecture import NUM_TRAIN_TIMESTEPS, kolors_scheduler


def make_scheduler() -> Any:
    """Kolors' training scheduler exactly as the stock trainer sets it up."""
    scheduler = kolors_scheduler()
    scheduler.set_timesteps(NUM_TRAIN_TIMESTEPS)
    return scheduler


def add_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline builds it: (h, w, 0, 0, h, w) per sample, flattened."""
    height, width = latents.shape[2] * 8, latents.shape[3] * 8
    return torch.tensor([height, width, 0, 0, height, width], device=latents.device).repeat(latents.shape[0])


def denoising_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                   timestep: torch.Tensor, texts: dict[str, torch.Tensor],
                   gradient_checkpointing: bool = False) -> torch.Tensor:
    """MSE between the UNet's prediction and the scheduler's target for given noise and timestep.

    `timestep` holds one value for the batch (the stock step) or one per sample (pretraining: the
    scheduler takes one timestep per call, so each sample is noised on its own).
    """
    params = list(unet.parameters())
    # the frozen weights' dtype (LoRA params are upcast to fp32); a fully trained UNet has only one
    dtype = next((p for p in params if not p.requires_grad), params[0]).dtype
    device = params[0].device
    latents, noise = latents.to(dtype=dtype, device=device), noise.to(dtype=dtype, device=device)
    timestep = timestep.to(device)
    rows = [slice(None)] if timestep.numel() == 1 else [slice(i, i + 1) for i in range(len(latents))]
    noisy_latents = torch.cat([scheduler.add_noise(latents[r], noise[r], timestep[r]) for r in rows])
    target = torch.cat([scheduler.training_target(latents[r], noise[r], timestep[r]) for r in rows])
    noise_pred = unet(
        noisy_latents, timestep=timestep,
        encoder_hidden_states=texts["encoder_hidden_states"].to(dtype=dtype, device=device),
        add_text_embeds=texts["add_text_embeds"].to(dtype=dtype, device=device),
        add_time_id=add_time_ids(latents), use_gradient_checkpointing=gradient_checkpointing)
    return torch.nn.functional.mse_loss(noise_pred.float(), target.float())
