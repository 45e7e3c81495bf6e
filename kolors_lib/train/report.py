"""Step 03's record of a run: LoRA metadata, loss.csv, the options that differ from the camp's run, and
TrainResult (what train_lora returns: paths, losses, validation losses, the loss-curve figure)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kolors_lib.core.config import Config, default_train
from kolors_lib.core.settings import TrainConfig
from kolors_lib.kolors.architecture import BETA_END, NUM_TRAIN_TIMESTEPS
from kolors_lib.train.validation import read_val_csv

# issue 12's options: only those changed from their default enter fingerprints and metadata, so a
# stock run's fingerprint (and its resumable checkpoints) stay what they were
OPTION_KEYS = ("val_fraction", "val_files", "val_every", "val_draws", "early_stop_patience", "keep_best",
               "optimizer", "optimizer_args", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
               "plateau_factor", "plateau_patience", "min_snr_gamma", "noise_offset", "buckets",
               "bucket_max_aspect", "augment_variants", "augment_crop_scale", "augment_jitter", "ema_decay",
               "base_quantization")


def changed_options(t: TrainConfig) -> dict[str, Any]:
    """The issue-12 training options that differ from their defaults."""
    default = default_train()
    return {k: getattr(t, k) for k in OPTION_KEYS if getattr(t, k) != getattr(default, k)}


def option_values(t: TrainConfig) -> list[str]:
    """changed_options as key=value strings."""
    return [f"{k}={v}" for k, v in changed_options(t).items()]


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


def truncate_loss_csv(path: Path, upto: int) -> None:
    """Keep loss.csv's rows up to step `upto` (a resumed run rewrites what follows)."""
    lines = path.read_text().splitlines()[1:] if path.is_file() else []
    with open(path, "w", newline="") as f:
        f.write("step,loss,lr\n")  # lr: the learning rate the step used
        f.writelines(f"{line}\n" for line in lines if line.strip() and int(line.split(",")[0]) <= upto)


def val_loss_figure(results: dict[str, TrainResult]) -> Any:
    """matplotlib Figure: each run's validation loss per step, side by side on one scale (compare_settings)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for name, result in results.items():
        rows = result.val_losses
        if rows:
            label = name if result.best_step is None else f"{name} (best step {result.best_step})"
            ax.plot(*zip(*rows, strict=True), "o-", lw=1.5, ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (held out)")
    ax.set_title("Same data, two settings")
    ax.legend()
    fig.tight_layout()
    return fig
