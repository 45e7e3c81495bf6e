"""Step 03: Kolors LoRA training with cached text/image encodings, on any Lightning accelerator.

The numerics are those of DiffSynth 1.1.9's stock trainer (`LightningModelForT2ILoRA` with the
Kolors example's settings): EnhancedDDIMScheduler(beta_end=0.014, 1100 steps) with
`set_timesteps(1100)`, epsilon target, one uniform timestep per batch, MSE, AdamW on peft LoRA
(gaussian init) over the UNet's to_q/to_k/to_v/to_out. What differs is where the inputs come
from: every caption is encoded once by ChatGLM and every image once by the fp16-fix VAE before
training, ChatGLM and the VAE are freed, and the steps read only the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_lib.architecture import BETA_END, NUM_TRAIN_TIMESTEPS, kolors_scheduler
from kolors_lib.compat import patch_torchvision
from kolors_lib.config import LORA_FILE, Config, LoraConfig, TrainConfig, apply_overrides, target_module_list
from kolors_lib.console import logged_step
from kolors_lib.encode_cache import (
    CachedDataset,
    CacheReport,
    build_cache,
    content_hash,
    load_text,
)
from kolors_lib.errors import NonFiniteLossError, TrainingError
from kolors_lib.files import atomic_path, move_aside, save_safetensors, save_torch
from kolors_lib.lock import one_writer
from kolors_lib.pictures import side_by_side
from kolors_lib.plan import Plan, device_plan
from kolors_lib.recipe import ema_state, make_ema, make_lr_scheduler, make_optimizer, min_snr_weight, offset_noise, snr

patch_torchvision()  # lightning imports torchvision (via torchmetrics); must come first

import lightning as L  # noqa: E402

from kolors_lib.validation import (  # noqa: E402
    BestTracker,
    ValidationCallback,
    ValidationSet,
    read_val_csv,
    split_samples,
    truncate_val_csv,
)

FINAL_NAME = LORA_FILE
CKPT_KEEP = 2  # checkpoints kept on disk (LoRA + AdamW state each)


# --------------------------------------------------------------------------- the module


def make_scheduler() -> Any:
    """Kolors' training scheduler exactly as the stock trainer sets it up."""
    scheduler = kolors_scheduler()
    scheduler.set_timesteps(NUM_TRAIN_TIMESTEPS)
    return scheduler


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


def load_unet(cfg: Config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The Kolors UNet alone, through the one DiffSynth loading path."""
    from kolors_lib.models import kolors_paths, load_model_manager

    manager = load_model_manager([kolors_paths(cfg).unet], device=device, dtype=dtype)
    return manager.fetch_model("sdxl_unet")


def add_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline builds it: (h, w, 0, 0, h, w) per sample, flattened."""
    height, width = latents.shape[2] * 8, latents.shape[3] * 8
    return torch.tensor([height, width, 0, 0, height, width], device=latents.device).repeat(latents.shape[0])


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
        self.options = options or TrainConfig()
        self.total_steps = 0
        self.tracker = BestTracker(self.options.early_stop_patience)
        self.plateau: Any = None
        self.ema: Any = None

    @classmethod
    def from_config(cls, cfg: Config, plan: Plan | None = None) -> KolorsLoraModule:
        """Load the UNet in the device plan's training dtype and add LoRA (gaussian init, as the Kolors example)."""
        unet = load_unet(cfg, (plan or device_plan(cfg)).get("train", "unet").torch_dtype)
        torch.manual_seed(cfg.seed)  # the gaussian LoRA init must not depend on what ran before
        return cls(inject_lora(unet, cfg.lora), cfg.lora, cfg.train.learning_rate,
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
        """MSE between the UNet's prediction and the scheduler's target for given noise and timestep."""
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents, noise = latents.to(dtype=dtype, device=self.device), noise.to(dtype=dtype, device=self.device)
        timestep = timestep.to(self.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timestep)
        target = self.scheduler.training_target(latents, noise, timestep)
        noise_pred = self.unet(
            noisy_latents, timestep=timestep,
            encoder_hidden_states=texts["encoder_hidden_states"].to(dtype=dtype, device=self.device),
            add_text_embeds=texts["add_text_embeds"].to(dtype=dtype, device=self.device),
            add_time_id=add_time_ids(latents), use_gradient_checkpointing=self.gradient_checkpointing)
        return torch.nn.functional.mse_loss(noise_pred.float(), target.float())

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


# --------------------------------------------------------------------------- checkpoints, results


def run_fingerprint(cfg: Config, report: CacheReport) -> str:
    """What must match for a checkpoint to be resumed (data, LoRA shape, optimisation settings)."""
    t = cfg.train
    parts = [str(cfg.lora.rank), str(cfg.lora.alpha), ",".join(cfg.lora.target_modules), str(t.learning_rate),
             str(t.batch_size), str(t.grad_accum), str(cfg.seed), str(cfg.resolution), str(t.random_flip),
             str(t.precision), *(s.image_key + s.text_key for s in report.samples), *option_values(t)]
    return content_hash(*parts)[:16]


# issue 12's options: only those changed from their default enter fingerprints and metadata, so a
# stock run's fingerprint (and its resumable checkpoints) stay what they were
OPTION_KEYS = ("val_fraction", "val_files", "val_every", "val_draws", "early_stop_patience", "keep_best",
               "optimizer", "optimizer_args", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
               "plateau_factor", "plateau_patience", "min_snr_gamma", "noise_offset", "buckets",
               "bucket_max_aspect", "augment_variants", "augment_crop_scale", "augment_jitter", "ema_decay")


def changed_options(t: TrainConfig) -> dict[str, Any]:
    """The issue-12 training options that differ from their defaults."""
    default = TrainConfig()
    return {k: getattr(t, k) for k in OPTION_KEYS if getattr(t, k) != getattr(default, k)}


def option_values(t: TrainConfig) -> list[str]:
    """changed_options as key=value strings."""
    return [f"{k}={v}" for k, v in changed_options(t).items()]


def checkpoint_dir(cfg: Config) -> Path:
    """Where resumable checkpoints go."""
    return cfg.lora_dir / "checkpoints"


def list_checkpoints(cfg: Config) -> list[Path]:
    """Checkpoints on disk, oldest first."""
    return sorted(checkpoint_dir(cfg).glob("step-*.pt"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save atomically, so a crash never leaves a half-written checkpoint."""
    save_torch(state, path)


def lora_metadata(cfg: Config, step: int, base_model: str = "Kwai-Kolors/Kolors") -> dict[str, str]:
    """safetensors metadata (strings only) describing the LoRA and how it was trained."""
    t = cfg.train
    return {"format": "diffsynth-peft", "base_model": base_model, "profile": cfg.profile,
            "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha), "scale": str(cfg.lora.scale),
            "target_modules": ",".join(cfg.lora.target_modules), "init_lora_weights": "gaussian",
            "trigger_word": cfg.filter.trigger_word or "", "steps": str(step),
            "learning_rate": str(t.learning_rate), "batch_size": str(t.batch_size),
            "grad_accum": str(t.grad_accum), "precision": str(t.precision), "resolution": str(cfg.resolution),
            "seed": str(cfg.seed), "center_crop": str(t.center_crop), "random_flip": str(t.random_flip),
            "scheduler": f"EnhancedDDIM(num_train_timesteps={NUM_TRAIN_TIMESTEPS}, beta_end={BETA_END})",
            "optimizer": t.optimizer, "lr_scheduler": t.lr_scheduler,
            **{k: str(v) for k, v in changed_options(t).items()}}


def read_loss_csv(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of loss.csv."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@dataclass
class TrainResult:
    """Where a training run left its outputs."""

    lora_path: Path
    loss_csv: Path
    checkpoints: list[Path]
    steps: int
    resumed_from: int
    seconds: float
    cache: Path
    validation_images: list[Path] = field(default_factory=list)
    val_csv: Path | None = None  # val_loss.csv, with a validation split
    best_step: int | None = None  # the step of the lowest validation loss
    stopped_at: int | None = None  # early stopping's step

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) per optimizer step."""
        return read_loss_csv(self.loss_csv)

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        """(step, validation loss) per validation (step 0: the untrained LoRA)."""
        return read_val_csv(self.val_csv) if self.val_csv else []

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second of this call (resumed steps excluded)."""
        return (self.steps - self.resumed_from) / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        new = self.steps - self.resumed_from
        if new == 0:
            run = f"all {self.steps} steps were done before (nothing to train)"
        elif self.resumed_from:
            run = f"resumed at step {self.resumed_from}, trained {new} more ({self.steps_per_second:.2f} steps/s)"
        else:
            run = f"trained {new} steps ({self.steps_per_second:.2f} steps/s)"
        if self.stopped_at is not None:
            run += f"; early stop at step {self.stopped_at}"
        if self.best_step is not None:
            run += f"; best validation loss at step {self.best_step}"
        return f"{run}; LoRA: {self.lora_path}"

    def loss_plot(self, smooth: int = 10) -> Any:
        """matplotlib Figure of the loss per step and its moving average (no display needed)."""
        from matplotlib.figure import Figure

        rows = self.losses
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot()
        if rows:
            steps, losses = zip(*rows, strict=True)
            ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
            k = max(1, min(smooth, len(losses)))
            avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                   for i in range(len(losses))]
            ax.plot(steps, avg, lw=1.5, label=f"mean of {k}")
            ax.legend()
        val = self.val_losses
        if val:
            ax.plot(*zip(*val, strict=True), "o-", lw=1.5, ms=3, label="validation loss (held out)")
            if self.best_step is not None:
                ax.axvline(self.best_step, ls=":", color="gray", label=f"best step {self.best_step}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("MSE loss")
        ax.set_title("Kolors LoRA training loss")
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- callbacks


class _RunCallback(L.Callback):
    """Per optimizer step: loss.csv row, tqdm bar, checkpoints every `save_every`, validation grids."""

    def __init__(self, cfg: Config, total: int, start: int, fingerprint: str,
                 validator: _Validator | None = None):
        self.cfg, self.total, self.start, self.fingerprint = cfg, total, start, fingerprint
        self.validator = validator
        self.loss_csv = cfg.loss_csv
        self.bar: Any = None
        self.last_step = start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from kolors_lib.console import progress as tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc="LoRA steps", unit="step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = self.start + trainer.global_step
        if step == self.last_step:
            return  # mid-accumulation
        self.last_step = step
        assert isinstance(pl_module, KolorsLoraModule)
        losses, pl_module.step_losses = pl_module.step_losses, []
        loss = sum(losses) / max(len(losses), 1)
        if not trainer.is_global_zero:
            return
        with open(self.loss_csv, "a", newline="") as f:
            f.write(f"{step},{loss:.8g},{pl_module.step_lr:.8g}\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        save_every = self.cfg.train.save_every
        if save_every and (step % save_every == 0 or step == self.total or trainer.should_stop):
            self._checkpoint(trainer, pl_module, step)
        every = self.cfg.train.validate_every
        if self.validator is not None and every and step % every == 0:
            self.validator.render(pl_module.unet, step)

    def _checkpoint(self, trainer: L.Trainer, module: KolorsLoraModule, step: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        state = {"step": step, "total": self.total, "fingerprint": self.fingerprint,
                 "lora": module.lora_state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "extra": module.extra_state()}
        save_checkpoint(checkpoint_dir(self.cfg) / f"step-{step:07d}.pt", state)
        for old in list_checkpoints(self.cfg)[:-CKPT_KEEP]:
            old.unlink(missing_ok=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def validation_texts(cfg: Config) -> tuple[list[str], str]:
    """The validation prompts as step 04 would send them (trigger word first) and the story's negative."""
    from kolors_lib.generation import trigger_word
    from kolors_lib.story import load_story, render_settings, with_trigger

    negative = render_settings(cfg, load_story(cfg.generate.story)).negative
    return [with_trigger(p, trigger_word(cfg)) for p in cfg.train.validation_prompts], negative


class _Validator:
    """Renders the validation prompts with step 04's renderer and settings, the training UNet and cached texts.

    Same pipeline call, scheduler, steps, cfg scale, size and negative prompt as the storyboard, so
    what you watch during training is what step 04 will give; one image per prompt (seed: cfg.seed + i).
    """

    def __init__(self, cfg: Config, report: CacheReport, plan: Plan):
        from kolors_lib.models import kolors_paths
        from kolors_lib.story import load_story, render_settings

        self.settings = render_settings(cfg, load_story(cfg.generate.story))
        self.prompts, negative = validation_texts(cfg)
        self.embeddings = {(p, True): load_text(report.root, report.validation_keys[p]) for p in self.prompts}
        self.embeddings[(negative, False)] = load_text(report.root, report.negative_key)
        self.cfg, self.root = cfg, kolors_paths(cfg).root
        self.tiled = plan.tiled_vae  # the VAE decode tiles when the plan says the untiled one does not fit
        self.renderer: Any = None
        self.out_dir = cfg.lora_dir / "validation"
        self.images: list[Path] = []

    @torch.no_grad()
    def render(self, unet: torch.nn.Module, step: int) -> Path:
        """One image per prompt, pasted side by side into validation/step-N.png."""
        from kolors_lib.generation import KolorsRenderer

        if self.renderer is None:
            device = str(next(unet.parameters()).device)
            self.renderer = KolorsRenderer.around_unet(self.root, unet, self.embeddings, device, self.tiled)
        was_training = unet.training
        unet.eval()
        s = self.settings
        tiles = [self.renderer.render(p, s.negative, self.cfg.seed + i, s.steps, s.cfg_scale, s.width, s.height)
                 for i, p in enumerate(self.prompts)]
        unet.train(was_training)
        path = self.out_dir / f"step-{step:07d}.png"
        with atomic_path(path) as tmp:
            side_by_side(tiles).save(tmp, format="PNG")
        self.images.append(path)
        return path


# --------------------------------------------------------------------------- train_lora


# train_lora's short keyword names; any other name is a train.* setting (or a dotted key)
_SHORT_NAMES = {"rank": "lora.rank", "alpha": "lora.alpha", "target_modules": "lora.target_modules",
                "lr": "train.learning_rate", "learning_rate": "train.learning_rate", "resolution": "resolution",
                "seed": "seed", "device": "device"}


def training_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """cfg with train_lora's keyword overrides (steps, batch_size..., rank, alpha, lr) by config's one route."""
    named = {_SHORT_NAMES.get(k) or (k if "." in k else f"train.{k}"): v for k, v in overrides.items()}
    cfg = apply_overrides(cfg, named)
    cfg.lora.target_modules = target_module_list(cfg.lora.target_modules)  # a preset name given as override
    return cfg


def total_steps(cfg: Config, n_images: int, world: int = 1) -> int:
    """Optimizer steps of the run: train.steps, or train.epochs passes over the data when set."""
    if cfg.train.epochs:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * world
        return max(1, math.ceil(cfg.train.epochs * n_images / per_step))
    return int(cfg.train.steps)


def _resume_state(cfg: Config, fingerprint: str, resume: bool, total: int) -> dict[str, Any] | None:
    """The newest checkpoint of this same run, or None; checkpoints not resumed are moved aside, never deleted.

    A run asked for fewer steps than its checkpoints hold trains anew: the later weights must never be
    saved tagged with the smaller step count.
    """
    ckpts = list_checkpoints(cfg)
    if not ckpts:
        return None
    why = "resume is off (--no-resume)"
    if resume:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        if state.get("fingerprint") != fingerprint:
            why = f"{ckpts[-1].name} belongs to a run with other data or settings"
        elif int(state["step"]) > total:
            why = f"{ckpts[-1].name} is past the {total} steps asked for"
        else:
            return state
    aside = move_aside(checkpoint_dir(cfg), "set-aside")
    warnings.warn(f"{why}: starting afresh; the earlier checkpoints are kept in {aside} (delete it when "
                  "no longer needed)", stacklevel=3)
    return None


def _truncate_loss_csv(path: Path, upto: int) -> None:
    lines = path.read_text().splitlines()[1:] if path.is_file() else []
    with open(path, "w", newline="") as f:
        f.write("step,loss,lr\n")  # lr: the learning rate the step used
        f.writelines(f"{line}\n" for line in lines if line.strip() and int(line.split(",")[0]) <= upto)


def save_lora(module: KolorsLoraModule, path: Path, metadata: dict[str, str]) -> Path:
    """Write the LoRA (DiffSynth/peft key names, fp32) as safetensors, atomically."""
    save_safetensors(module.lora_state_dict(), path, metadata)
    return path


def _world_size(devices: Any, accelerator: str) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, list | tuple):
        return len(devices)
    return 1 if accelerator in ("cpu", "auto") or not torch.cuda.is_available() else torch.cuda.device_count()


@logged_step("03_train")
@one_writer("train")
def train_lora(cfg: Config, *, resume: bool = True, callbacks: Iterable[L.Callback] = (),
               **overrides: Any) -> TrainResult:
    """Cache encodings, train the LoRA with Lightning, checkpoint/resume, write kolors_lora.safetensors."""
    cfg = training_overrides(cfg, overrides)
    t = cfg.train
    begin = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    validating = bool(t.validate_every and t.validation_prompts)
    prompts, negative = validation_texts(cfg) if validating else ([], "")
    plan = device_plan(cfg)
    report = build_cache(cfg, prompts, negative, plan)
    train_samples, held_out = split_samples(report.samples, t, cfg.seed)
    _check_options(t, held_out)
    fingerprint = run_fingerprint(cfg, report)
    world = _world_size(t.devices, t.accelerator)
    total = total_steps(cfg, len(train_samples), world)
    state = _resume_state(cfg, fingerprint, resume, total)
    start = int(state["step"]) if state else 0
    cfg.lora_dir.mkdir(parents=True, exist_ok=True)
    loss_csv = cfg.loss_csv
    _truncate_loss_csv(loss_csv, start)
    if held_out:
        truncate_val_csv(cfg.val_loss_csv, start)
    else:
        cfg.val_loss_csv.unlink(missing_ok=True)  # a log of another run's split
    module = KolorsLoraModule.from_config(cfg, plan)
    module.sample_offset, module.total_steps = start * t.grad_accum, total
    if state:
        module.load_lora_state_dict(state["lora"])
        module.resume_state = state
        module.tracker.load_state_dict((state.get("extra") or {}).get("tracker") or {})
    valset = ValidationSet(report, held_out, cfg.seed, t.val_draws) if held_out else None
    if start < total and module.tracker.stopped_at is None:
        _fit(cfg, plan, module, dataclasses.replace(report, samples=train_samples), start, total, world,
             fingerprint, list(callbacks), valset)
    last = module.tracker.stopped_at or total
    final = _save_outputs(cfg, module, last, valset is not None)
    validator_images = sorted((cfg.lora_dir / "validation").glob("step-*.png"))
    return TrainResult(final, loss_csv, list_checkpoints(cfg), last, start, time.perf_counter() - begin,
                       report.root, validator_images, cfg.val_loss_csv if held_out else None,
                       module.tracker.best_step if held_out else None, module.tracker.stopped_at)


def _check_options(t: TrainConfig, held_out: list[Any]) -> None:
    """Options that need a validation split fail early, naming the setting."""
    for needs, name in ((t.early_stop_patience, "train.early_stop_patience"),
                        (t.lr_scheduler == "plateau", "train.lr_scheduler: plateau")):
        if needs and not held_out:
            raise TrainingError(f"{name} needs a validation split: set train.val_fraction or train.val_files")
    if held_out and t.val_every < 1:
        raise TrainingError("train.val_every must be at least 1 with a validation split")


def _save_outputs(cfg: Config, module: KolorsLoraModule, last: int, validating: bool) -> Path:
    """kolors_lora.safetensors (the best validation step with keep_best, else the last), + .last/.best/.ema."""
    meta = lora_metadata(cfg, last)
    lora_dir, tracker = cfg.lora_dir, module.tracker
    ema = module.ema_state_dict()
    if ema is not None:
        save_safetensors(ema, lora_dir / LORA_FILE.replace(".safetensors", ".ema.safetensors"),
                         {**meta, "ema_decay": str(cfg.train.ema_decay)})
    if not (validating and tracker.best_lora is not None):
        return save_lora(module, cfg.lora_path, meta)
    best_meta = {**meta, "steps": str(tracker.best_step), "val_loss": f"{tracker.best:.8g}", "last_step": str(last)}
    save_safetensors(tracker.best_lora, lora_dir / LORA_FILE.replace(".safetensors", ".best.safetensors"), best_meta)
    if not cfg.train.keep_best:
        return save_lora(module, cfg.lora_path, meta)
    save_lora(module, lora_dir / LORA_FILE.replace(".safetensors", ".last.safetensors"), meta)
    return save_safetensors(tracker.best_lora, cfg.lora_path, best_meta)


def _strategy(name: str) -> str:
    """Plain "ddp" re-launches the running script, impossible from a notebook: fork there instead."""
    import __main__

    return "ddp_notebook" if name == "ddp" and not hasattr(__main__, "__file__") else name


def _fit(cfg: Config, plan: Plan, module: KolorsLoraModule, report: CacheReport, start: int, total: int,
         world: int, fingerprint: str, callbacks: list[L.Callback], valset: ValidationSet | None = None) -> None:
    t = cfg.train
    remaining = total - start
    if t.buckets:  # whole batches, one bucket each (batch_size=None: the dataset batches)
        from kolors_lib.buckets import BucketBatches

        dataset: torch.utils.data.Dataset = BucketBatches(report, start * t.grad_accum * world,
                                                          remaining * t.grad_accum * world, cfg.seed,
                                                          t.batch_size, t.random_flip)
    else:
        dataset = CachedDataset(report, start * t.batch_size * t.grad_accum * world,
                                remaining * t.batch_size * t.grad_accum * world, cfg.seed, t.random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None if t.buckets else t.batch_size, shuffle=False,
                                         num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    validator = _Validator(cfg, report, plan) if t.validate_every and t.validation_prompts else None
    run = _RunCallback(cfg, total, start, fingerprint, validator)
    # the validation callback goes before `run`, so a checkpoint holds this step's validation
    val = [ValidationCallback(valset, cfg.val_loss_csv, t.val_every, start, total)] if valset else []
    trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=_strategy(t.strategy),
                        precision=plan.precision,
                        max_steps=remaining, max_epochs=-1, accumulate_grad_batches=t.grad_accum,
                        callbacks=[*val, run, *callbacks], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(cfg.lora_dir))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        run.close()


