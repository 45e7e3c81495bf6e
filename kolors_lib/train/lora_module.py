"""Step 03's Lightning module: the Kolors UNet with peft LoRA, the stock trainer's loss and AdamW, and
issue 12's options (optimizers, learning-rate schedules, min-SNR-γ, noise offset, EMA).

The numerics with every option off are those of DiffSynth 1.1.9's `LightningModelForT2ILoRA` with the
Kolors example's settings (see kolors_lib.train.training).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import Config, default_train
from kolors_lib.core.device_plan import Plan, device_plan
from kolors_lib.core.errors import ConfigError, NonFiniteLossError, TrainingError
from kolors_lib.core.settings import TARGET_PRESETS, LoraConfig, TrainConfig
from kolors_lib.kolors.quantize import quantize_base
from kolors_lib.train.denoise import denoising_loss, make_scheduler
from kolors_lib.train.optim import (
    ema_state,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    min_snr_weight,
    offset_noise,
    snr,
)

patch_torchvision()  # lightning imports torchvision (via torchmetrics); must come first

import lightning as L  # noqa: E402

from kolors_lib.train.validation import BestTracker  # noqa: E402

# --------------------------------------------------------------------------- the module


def inject_lora(unet: torch.nn.Module, lora: LoraConfig, init: str = "gaussian") -> torch.nn.Module:
    """Freeze `unet` and add peft LoRA like the stock trainer (LoRA params upcast to fp32)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=init,
                            target_modules=list(lora.target_modules))
    unet = inject_adapter_in_model(config, unet)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.to(torch.float32)
    return unet


def check_target_modules(cfg: Config) -> list[str]:
    """lora.target_modules, each matching a layer of the profile's UNet as peft matches them (a name or a
    dotted suffix); checked on the meta-device skeleton before any encoding or training."""
    from kolors_lib.kolors.models import kolors_paths, unet_skeleton

    layers = [name for name, module in unet_skeleton(kolors_paths(cfg).unet).named_modules()
              if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)]
    targets = list(cfg.lora.target_modules)
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in layers)]
    if unknown or not targets:
        raise ConfigError(f"lora.target_modules: {', '.join(unknown) or 'an empty list'} matches no layer of the "
                          f"UNet: use a preset ({', '.join(TARGET_PRESETS)}) or layer names such as "
                          f"{', '.join(TARGET_PRESETS['all_linear'])}")
    return targets


def load_unet(cfg: Config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The Kolors UNet alone, through the one DiffSynth loading path."""
    from kolors_lib.kolors.models import kolors_paths, load_model_manager

    manager = load_model_manager([kolors_paths(cfg).unet], device=device, dtype=dtype)
    return manager.fetch_model("sdxl_unet")


class KolorsLoraModule(L.LightningModule):
    """The Kolors UNet with LoRA, trained on cached latents and text embeddings."""

    def __init__(self, unet: torch.nn.Module, lora: LoraConfig, learning_rate: float = 1e-4,
                 gradient_checkpointing: bool = True, seed: int = 0, sample_offset: int = 0,
                 options: TrainConfig | None = None):
        super().__init__()
        self.unet = unet.train()  # DiffSynth loads in eval mode; checkpointing needs train mode
        self.lora = lora
        self.learning_rate = learning_rate
        self.gradient_checkpointing = gradient_checkpointing
        self.scheduler = make_scheduler()
        self.seed = seed
        self.sample_offset = sample_offset  # micro-batches done before this run (resume)
        self.step_losses: list[float] = []  # micro-batch losses of the current optimizer step
        self.step_lr = learning_rate  # the learning rate of the current optimizer step (loss.csv)
        self.resume_state: dict[str, Any] | None = None
        # issue 12's options (defaults: the stock step); total_steps drives the learning-rate schedule
        self.options = options or default_train()
        self.total_steps = 0
        self.tracker = BestTracker(self.options.early_stop_patience)
        self.plateau: Any = None
        self.ema: Any = None

    @classmethod
    def from_config(cls, cfg: Config, plan: Plan | None = None) -> KolorsLoraModule:
        """Load the UNet in the device plan's training dtype and add LoRA (gaussian init, as the Kolors example)."""
        place = (plan or device_plan(cfg)).get("train", "unet")
        unet = load_unet(cfg, place.torch_dtype)
        torch.manual_seed(cfg.seed)  # the gaussian LoRA init must not depend on what ran before
        # LoRA first, then the frozen base in int8/nf4 (plan's `train.base_quantization`): the LoRA stays fp32
        unet = quantize_base(inject_lora(unet, cfg.lora), place.quantization, place.device)
        return cls(unet, cfg.lora, cfg.train.learning_rate,
                   cfg.train.gradient_checkpointing, cfg.seed, options=cfg.train)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA tensors in DiffSynth/peft naming (blocks.N....lora_A.default.weight)."""
        return {n: p.detach().to("cpu").clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy LoRA tensors in (missing or unexpected names are an error)."""
        params = dict(self.unet.named_parameters())
        if set(state) != {n for n, p in params.items() if p.requires_grad}:
            raise TrainingError("LoRA checkpoint does not match this UNet/LoRA shape")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Noise and timestep depend on the micro-batch number only, so a resumed run draws what
        # the uninterrupted one would have; ranks differ so DDP replicas see different noise.
        torch.manual_seed(self.seed * 1_000_003 + (self.sample_offset + batch_idx) * 97 + self.global_rank)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stock trainer's loss on a cached batch (same RNG calls in the same order).

        Noise offset and min-SNR-γ (off by default) change it as their formulas say; the noise offset's
        draw comes after the stock draws, so they stay the same.
        """
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = batch["latents"].to(dtype=dtype, device=self.device)
        noise = torch.randn_like(latents)
        timestep_id = torch.randint(0, self.scheduler.num_train_timesteps, (1,))
        if self.options.noise_offset:
            noise = offset_noise(latents, noise, self.options.noise_offset)
        timestep = self.scheduler.timesteps[timestep_id].to(self.device)
        loss = self.denoising_loss(latents, noise, timestep, batch)
        loss = loss * self.scheduler.training_weight(timestep)
        if self.options.min_snr_gamma:
            loss = loss * min_snr_weight(snr(self.scheduler.alphas_cumprod, timestep), self.options.min_snr_gamma)
        return loss

    def denoising_loss(self, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor,
                       texts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The one denoising loss (kolors_lib.train.denoise) on this module's UNet and scheduler."""
        return denoising_loss(self.unet, self.scheduler, latents, noise, timestep, texts, self.gradient_checkpointing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch: loss, with a hard stop on NaN/inf before it can reach the weights."""
        loss = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            step = self.sample_offset // max(self._accum(), 1) + self.global_step + 1
            raise NonFiniteLossError(f"loss is {value} at step {step}; the weights were not updated. "
                                     "Lower the learning rate or check the data; the last good "
                                     "checkpoint is kept")
        self.step_losses.append(value)
        if self._trainer is not None:  # the learning rate this step uses (schedulers step after it)
            self.step_lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        if self._trainer is not None:
            self.log("train_loss", loss, prog_bar=False, logger=False)
        return loss

    def _accum(self) -> int:
        return self.trainer.accumulate_grad_batches if self._trainer is not None else 1

    def configure_optimizers(self) -> Any:
        """train.optimizer (AdamW with torch defaults, as the stock trainer) on the LoRA parameters only,
        and train.lr_scheduler: per step by Lightning, or `plateau` by the validation callback."""
        o = self.options
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = make_optimizer(o.optimizer, params, self.learning_rate, o.optimizer_args)
        if o.ema_decay:
            self.ema = make_ema(params, o.ema_decay)
        if o.lr_scheduler == "constant" and not o.lr_warmup_steps:
            return optimizer  # the stock run: no scheduler object at all
        schedule = make_lr_scheduler(o.lr_scheduler, optimizer, self.total_steps, o.lr_warmup_steps,
                                     o.lr_num_cycles, o.plateau_factor, o.plateau_patience)
        if o.lr_scheduler == "plateau":
            self.plateau = schedule
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the EMA of the LoRA weights (when train.ema_decay is set)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step([p for p in self.unet.parameters() if p.requires_grad])

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA LoRA weights named like lora_state_dict() (from the resumed checkpoint when no step ran)."""
        if self.ema is not None:
            shadow = self.ema.shadow_params
        elif self.options.ema_decay and self.resume_state and (self.resume_state.get("extra") or {}).get("ema"):
            shadow = self.resume_state["extra"]["ema"]["shadow_params"]
        else:
            return None
        names = [n for n, p in self.unet.named_parameters() if p.requires_grad]
        return {n: p.detach().to("cpu").clone() for n, p in zip(names, shadow, strict=True)}

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the LoRA and optimizer: schedule, best step, plateau, EMA."""
        schedulers = self.trainer.lr_scheduler_configs if self._trainer is not None else []
        return {"lr_scheduler": schedulers[0].scheduler.state_dict() if schedulers else None,
                "tracker": self.tracker.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau is not None else None,
                "ema": ema_state(self.ema) if self.ema is not None else None}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        schedulers = self.trainer.lr_scheduler_configs
        if schedulers and extra.get("lr_scheduler"):
            schedulers[0].scheduler.load_state_dict(extra["lr_scheduler"])
        if self.plateau is not None and extra.get("plateau"):
            self.plateau.load_state_dict(extra["plateau"])
        if self.ema is not None and extra.get("ema"):
            state = dict(extra["ema"])
            device = next(p for p in self.unet.parameters() if p.requires_grad).device
            state["shadow_params"] = [p.to(device) for p in state["shadow_params"]]
            self.ema.load_state_dict(state)

    def on_train_start(self) -> None:
        # Lightning keeps modules' modes; DiffSynth loads in eval, and the UNet's gradient
        # checkpointing only applies in train mode (the stock trainer calls .train() too)
        self.unet.train()
        if self.resume_state is None:
            return
        self.trainer.optimizers[0].load_state_dict(self.resume_state["optimizer"])
        self._load_extra_state(self.resume_state.get("extra") or {})
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and self.resume_state.get("scaler"):
            scaler.load_state_dict(self.resume_state["scaler"])
