"""Step 03: Kolors LoRA training with cached text/image encodings, on any Lightning accelerator.

The numerics are those of DiffSynth 1.1.9's stock trainer (`LightningModelForT2ILoRA` with the
Kolors example's settings): EnhancedDDIMScheduler(beta_end=0.014, 1100 steps) with
`set_timesteps(1100)`, epsilon target, one uniform timestep per batch, MSE, AdamW on peft LoRA
(gaussian init) over the UNet's to_q/to_k/to_v/to_out. What differs is where the inputs come
from: every caption is encoded once by ChatGLM and every image once by the fp16-fix VAE before
training, ChatGLM and the VAE are freed, and the steps read only the cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import LORA_FILE, Config
from kolors_lib.core.console import logged_step
from kolors_lib.core.device_plan import Plan, device_plan
from kolors_lib.core.errors import TrainingError
from kolors_lib.core.files import atomic_path, move_aside, save_safetensors, save_torch
from kolors_lib.core.images import side_by_side
from kolors_lib.core.inputs import training_overrides
from kolors_lib.core.lock import one_writer
from kolors_lib.core.settings import TrainConfig
from kolors_lib.train.cache import CachedDataset, CacheReport, build_cache, content_hash, load_text

patch_torchvision()  # lightning imports torchvision (via torchmetrics); must come first

import lightning as L  # noqa: E402

from kolors_lib.train.lora_module import KolorsLoraModule, check_target_modules  # noqa: E402
from kolors_lib.train.report import TrainResult, lora_metadata, option_values, truncate_loss_csv  # noqa: E402
from kolors_lib.train.validation import ValidationCallback, ValidationSet, split_samples, truncate_val_csv  # noqa: E402

__all__ = ["CKPT_KEEP", "FINAL_NAME", "checkpoint_dir", "compare_settings", "list_checkpoints", "total_steps",
           "train_lora"]

FINAL_NAME = LORA_FILE
CKPT_KEEP = 2  # checkpoints kept on disk (LoRA + AdamW state each)


# --------------------------------------------------------------------------- checkpoints, results


def run_fingerprint(cfg: Config, report: CacheReport) -> str:
    """What must match for a checkpoint to be resumed (data, LoRA shape, optimisation settings)."""
    t = cfg.train
    parts = [str(cfg.lora.rank), str(cfg.lora.alpha), ",".join(cfg.lora.target_modules), str(t.learning_rate),
             str(t.batch_size), str(t.grad_accum), str(cfg.seed), str(cfg.resolution), str(t.random_flip),
             str(t.precision), *(s.image_key + s.text_key for s in report.samples), *option_values(t)]
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
            from kolors_lib.core.console import progress as tqdm

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
    from kolors_lib.kolors.story import load_story, render_settings, with_trigger
    from kolors_lib.storyboard.storyboard import trigger_word

    negative = render_settings(cfg, load_story(cfg.generate.story)).negative
    return [with_trigger(p, trigger_word(cfg)) for p in cfg.train.validation_prompts], negative


class _Validator:
    """Renders the validation prompts with step 04's renderer and settings, the training UNet and cached texts.

    Same pipeline call, scheduler, steps, cfg scale, size and negative prompt as the storyboard, so
    what you watch during training is what step 04 will give; one image per prompt (seed: cfg.seed + i).
    """

    def __init__(self, cfg: Config, report: CacheReport, plan: Plan):
        from kolors_lib.kolors.models import kolors_paths
        from kolors_lib.kolors.story import load_story, render_settings

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
        from kolors_lib.kolors.renderer import KolorsRenderer

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
    check_target_modules(cfg)  # a layer name peft would not find fails now, not after the cache is built
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
    truncate_loss_csv(loss_csv, start)
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


def compare_settings(cfg: Config, settings: dict[str, dict[str, Any]], **common: Any) -> dict[str, TrainResult]:
    """Train each named setting on step 02's data in its own folder (lora/compare/NAME); same held-out split.

    `common` goes to every run (e.g. steps, val_fraction); the main LoRA in lora/ is never touched.
    """
    results = {}
    for name, overrides in settings.items():
        run = dataclasses.replace(cfg, workdir=cfg.lora_dir / "compare" / name)
        if not run.train_dir.exists():  # the same images, not a copy
            run.train_dir.parent.mkdir(parents=True, exist_ok=True)
            run.train_dir.symlink_to(cfg.train_dir.resolve(), target_is_directory=True)
        results[name] = train_lora(run, **{**common, **overrides})
    return results


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
        from kolors_lib.train.cache import BucketBatches

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


# the learner's API; KolorsLoraModule (a LightningModule) stays importable but out of help(), which would
# otherwise list Lightning's ~2,900 lines of inherited methods
