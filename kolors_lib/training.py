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
from kolors_lib.config import LORA_FILE, Config, LoraConfig
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
from kolors_lib.inputs import training_overrides
from kolors_lib.lock import one_writer
from kolors_lib.pictures import side_by_side
from kolors_lib.plan import Plan, device_plan

patch_torchvision()  # lightning imports torchvision (via torchmetrics); must come first

import lightning as L  # noqa: E402

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
                 gradient_checkpointing: bool = True, seed: int = 0, sample_offset: int = 0):
        super().__init__()
        self.unet = unet.train()  # DiffSynth loads in eval mode; checkpointing needs train mode
        self.lora = lora
        self.learning_rate = learning_rate
        self.gradient_checkpointing = gradient_checkpointing
        self.scheduler = make_scheduler()
        self.seed = seed
        self.sample_offset = sample_offset  # micro-batches done before this run (resume)
        self.step_losses: list[float] = []  # micro-batch losses of the current optimizer step
        self.resume_state: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Config, plan: Plan | None = None) -> KolorsLoraModule:
        """Load the UNet in the device plan's training dtype and add LoRA (gaussian init, as the Kolors example)."""
        unet = load_unet(cfg, (plan or device_plan(cfg)).get("train", "unet").torch_dtype)
        torch.manual_seed(cfg.seed)  # the gaussian LoRA init must not depend on what ran before
        return cls(inject_lora(unet, cfg.lora), cfg.lora, cfg.train.learning_rate,
                   cfg.train.gradient_checkpointing, cfg.seed)

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
        """The stock trainer's loss on a cached batch (same RNG calls in the same order)."""
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = batch["latents"].to(dtype=dtype, device=self.device)
        noise = torch.randn_like(latents)
        timestep_id = torch.randint(0, self.scheduler.num_train_timesteps, (1,))
        timestep = self.scheduler.timesteps[timestep_id].to(self.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timestep)
        target = self.scheduler.training_target(latents, noise, timestep)
        noise_pred = self.unet(
            noisy_latents, timestep=timestep,
            encoder_hidden_states=batch["encoder_hidden_states"].to(dtype=dtype, device=self.device),
            add_text_embeds=batch["add_text_embeds"].to(dtype=dtype, device=self.device),
            add_time_id=add_time_ids(latents), use_gradient_checkpointing=self.gradient_checkpointing)
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float())
        return loss * self.scheduler.training_weight(timestep)

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
        if self._trainer is not None:
            self.log("train_loss", loss, prog_bar=False, logger=False)
        return loss

    def _accum(self) -> int:
        return self.trainer.accumulate_grad_batches if self._trainer is not None else 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (torch defaults, as the stock trainer) on the LoRA parameters only."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate)

    def on_train_start(self) -> None:
        # Lightning keeps modules' modes; DiffSynth loads in eval, and the UNet's gradient
        # checkpointing only applies in train mode (the stock trainer calls .train() too)
        self.unet.train()
        if self.resume_state is None:
            return
        self.trainer.optimizers[0].load_state_dict(self.resume_state["optimizer"])
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and self.resume_state.get("scaler"):
            scaler.load_state_dict(self.resume_state["scaler"])


# --------------------------------------------------------------------------- checkpoints, results


def run_fingerprint(cfg: Config, report: CacheReport) -> str:
    """What must match for a checkpoint to be resumed (data, LoRA shape, optimisation settings)."""
    t = cfg.train
    parts = [str(cfg.lora.rank), str(cfg.lora.alpha), ",".join(cfg.lora.target_modules), str(t.learning_rate),
             str(t.batch_size), str(t.grad_accum), str(cfg.seed), str(cfg.resolution), str(t.random_flip),
             str(t.precision), *(s.image_key + s.text_key for s in report.samples)]
    return content_hash(*parts)[:16]


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
            "scheduler": f"EnhancedDDIM(num_train_timesteps={NUM_TRAIN_TIMESTEPS}, beta_end={BETA_END})"}


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

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) per optimizer step."""
        return read_loss_csv(self.loss_csv)

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
            f.write(f"{step},{loss:.8g}\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        save_every = self.cfg.train.save_every
        if save_every and (step % save_every == 0 or step == self.total):
            self._checkpoint(trainer, pl_module, step)
        every = self.cfg.train.validate_every
        if self.validator is not None and every and step % every == 0:
            self.validator.render(pl_module.unet, step)

    def _checkpoint(self, trainer: L.Trainer, module: KolorsLoraModule, step: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        state = {"step": step, "total": self.total, "fingerprint": self.fingerprint,
                 "lora": module.lora_state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None}
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
    rows = [r for r in read_loss_csv(path) if r[0] <= upto]
    with open(path, "w", newline="") as f:
        f.write("step,loss\n")
        f.writelines(f"{s},{v:.8g}\n" for s, v in rows)


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
    fingerprint = run_fingerprint(cfg, report)
    world = _world_size(t.devices, t.accelerator)
    total = total_steps(cfg, len(report.samples), world)
    state = _resume_state(cfg, fingerprint, resume, total)
    start = int(state["step"]) if state else 0
    cfg.lora_dir.mkdir(parents=True, exist_ok=True)
    loss_csv = cfg.loss_csv
    _truncate_loss_csv(loss_csv, start)
    module = KolorsLoraModule.from_config(cfg, plan)
    module.sample_offset = start * t.grad_accum
    if state:
        module.load_lora_state_dict(state["lora"])
        module.resume_state = state
    if start < total:
        _fit(cfg, plan, module, report, start, total, world, fingerprint, list(callbacks))
    final = save_lora(module, cfg.lora_path, lora_metadata(cfg, total))
    validator_images = sorted((cfg.lora_dir / "validation").glob("step-*.png"))
    return TrainResult(final, loss_csv, list_checkpoints(cfg), total, start, time.perf_counter() - begin,
                       report.root, validator_images)


def _strategy(name: str) -> str:
    """Plain "ddp" re-launches the running script, impossible from a notebook: fork there instead."""
    import __main__

    return "ddp_notebook" if name == "ddp" and not hasattr(__main__, "__file__") else name


def _fit(cfg: Config, plan: Plan, module: KolorsLoraModule, report: CacheReport, start: int, total: int,
         world: int, fingerprint: str, callbacks: list[L.Callback]) -> None:
    t = cfg.train
    remaining = total - start
    dataset = CachedDataset(report, start * t.batch_size * t.grad_accum * world,
                            remaining * t.batch_size * t.grad_accum * world, cfg.seed, t.random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=False,
                                         num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    validator = _Validator(cfg, report, plan) if t.validate_every and t.validation_prompts else None
    run = _RunCallback(cfg, total, start, fingerprint, validator)
    trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=_strategy(t.strategy),
                        precision=plan.precision,
                        max_steps=remaining, max_epochs=-1, accumulate_grad_batches=t.grad_accum,
                        callbacks=[run, *callbacks], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(cfg.lora_dir))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        run.close()


# the learner's API; KolorsLoraModule (a LightningModule) stays importable but out of help(), which would
# otherwise list Lightning's ~2,900 lines of inherited methods
__all__ = ["TrainResult", "add_time_ids", "checkpoint_dir", "inject_lora", "list_checkpoints", "load_unet",
           "lora_metadata", "make_scheduler", "read_loss_csv", "total_steps", "train_lora", "training_overrides"]
