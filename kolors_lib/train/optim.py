"""Step 03's training recipe options: optimizer, learning-rate schedule, loss weighting, noise offset, EMA.

Each comes from its maintained package (torch, diffusers, transformers, lion-pytorch, prodigyopt,
bitsandbytes), never re-implemented here; with every option at its default the step is DiffSynth's
stock one (AdamW, constant learning rate, plain MSE, no EMA).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.errors import TrainingError
from kolors_lib.core.settings import LR_SCHEDULERS, OPTIMIZERS


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   extra: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` from its package, with lr and `extra` keyword arguments."""
    params, extra = list(params), dict(extra or {})
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **extra)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, **extra)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate (the schedule is ours): no relative step, no parameter scaling
        settings = {"scale_parameter": False, "relative_step": False, "warmup_init": False} | extra
        return Adafactor(params, lr=lr, **settings)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, **extra)
    if name in ("adamw8bit", "lion8bit"):
        return _bitsandbytes(name, params, lr, extra)
    raise TrainingError(f"train.optimizer {name!r} is not known: choose one of {', '.join(OPTIMIZERS)}")


def _bitsandbytes(name: str, params: list[torch.nn.Parameter], lr: float,
                  extra: dict[str, Any]) -> torch.optim.Optimizer:
    """8-bit AdamW / Lion: bitsandbytes on CUDA only."""
    on_cuda = torch.cuda.is_available() and all(p.device.type == "cuda" for p in params)
    if not on_cuda:
        raise TrainingError(f"train.optimizer {name!r} needs a CUDA GPU (bitsandbytes' 8-bit optimizers); "
                            "use adamw or lion on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(f"train.optimizer {name!r} needs bitsandbytes: pip install bitsandbytes==0.50.2 "
                            "(CUDA machines only)") from None
    cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
    return cls(params, lr=lr, **extra)


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                      num_cycles: int = 1, plateau_factor: float = 0.5, plateau_patience: int = 2) -> Any:
    """diffusers' get_scheduler for the per-step schedules; torch's ReduceLROnPlateau for `plateau`."""
    if name == "plateau":
        # stepped with the validation loss after each validation, not per step
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=plateau_factor,
                                                          patience=plateau_patience)
    if name not in LR_SCHEDULERS:
        raise TrainingError(f"train.lr_scheduler {name!r} is not known: choose one of {', '.join(LR_SCHEDULERS)}")
    patch_torchvision()
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles)


def snr(alphas_cumprod: torch.Tensor | list[float], timestep: torch.Tensor) -> float:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at a (single) training timestep."""
    alpha = float(alphas_cumprod[int(timestep.flatten()[0])])
    return alpha / (1.0 - alpha)


def min_snr_weight(snr_t: float, gamma: float) -> float:
    """Min-SNR-γ loss weight for an ε-prediction model (Hang et al. 2023): min(SNR, γ) / SNR."""
    return min(snr_t, gamma) / snr_t


def offset_noise(latents: torch.Tensor, noise: torch.Tensor, offset: float) -> torch.Tensor:
    """Noise offset: noise + offset·N(0,1) per sample and channel (a shift of the whole channel)."""
    shift = torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device, dtype=latents.dtype)
    return noise + offset * shift


def make_ema(params: Iterable[torch.nn.Parameter], decay: float) -> Any:
    """diffusers' EMAModel over the LoRA parameters (decay warms up as (1+n)/(10+n), capped at `decay`)."""
    patch_torchvision()
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay)


def ema_state(ema: Any) -> dict[str, Any]:
    """A copy of the EMA state (its own state_dict returns references that later steps change)."""
    state = dict(ema.state_dict())
    state["shadow_params"] = [p.detach().to("cpu").clone() for p in state["shadow_params"]]
    return state
