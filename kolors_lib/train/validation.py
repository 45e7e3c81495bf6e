"""Step 03's held-out validation: the split, a deterministic validation loss, early stopping, the best step.

The validation loss is the training objective (ε-prediction MSE, unweighted, no noise offset) on
held-out images with noise and timesteps fixed per image, so two evaluations of the same LoRA give the
same number and runs with different options compare on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.errors import TrainingError
from kolors_lib.core.settings import TrainConfig
from kolors_lib.train.cache import CacheReport, Sample, content_hash, load_latents, load_text

patch_torchvision()  # lightning imports torchvision (via torchmetrics)

import lightning as L  # noqa: E402

VAL_HEADER = "step,val_loss\n"


# --------------------------------------------------------------------------- the split


def split_samples(samples: Sequence[Sample], t: TrainConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out) samples: train.val_files by name, else a train.val_fraction drawn by (seed, name)."""
    samples = list(samples)
    if t.val_files:
        names = {s.file_name for s in samples}
        missing = [n for n in t.val_files if n not in names]
        if missing:
            raise TrainingError(f"train.val_files: {', '.join(missing)} not in train/metadata.csv")
        held = set(t.val_files)
    elif t.val_fraction:
        if not 0 < t.val_fraction < 1:
            raise TrainingError(f"train.val_fraction must be between 0 and 1, not {t.val_fraction}")
        count = max(1, round(t.val_fraction * len(samples)))
        ranked = sorted(samples, key=lambda s: content_hash(str(seed), s.file_name))
        held = {s.file_name for s in ranked[:count]}
    else:
        return samples, []
    train = [s for s in samples if s.file_name not in held]
    if not train:
        raise TrainingError("the validation split leaves no image to train on: hold out fewer images")
    return train, [s for s in samples if s.file_name in held]


# --------------------------------------------------------------------------- the loss


@dataclass
class _Item:
    latents: torch.Tensor
    texts: dict[str, torch.Tensor]
    noise: torch.Tensor  # [draws, C, h, w]
    timestep_ids: list[int]


class ValidationSet:
    """Held-out images with noise and timesteps fixed per (seed, image): the loss is a function of the weights."""

    def __init__(self, report: CacheReport, samples: Sequence[Sample], seed: int, draws: int = 4,
                 num_timesteps: int = 1100):
        if not samples:
            raise TrainingError("a validation set needs at least one image")
        self.items = []
        for s in samples:
            latents = load_latents(report.root, s.image_key)["latents"]
            g = torch.Generator().manual_seed(int(content_hash(str(seed), s.image_key)[:12], 16))
            # stratified timesteps: one per 1/draws of the schedule, so every noise level is seen
            ids = [min(num_timesteps - 1, int((k + float(torch.rand(1, generator=g))) * num_timesteps / draws))
                   for k in range(draws)]
            noise = torch.randn((draws, *latents.shape), generator=g)
            self.items.append(_Item(latents, load_text(report.root, s.text_key), noise, ids))

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def loss(self, module: Any, trainer: L.Trainer | None = None) -> float:
        """Mean validation loss of `module` (a KolorsLoraModule) over images and draws."""
        context = trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()
        scheduler, total, count = module.scheduler, 0.0, 0
        with context:
            for item in self.items:
                latents = item.latents[None]
                for k, tid in enumerate(item.timestep_ids):
                    timestep = scheduler.timesteps[tid: tid + 1]
                    total += float(module.denoising_loss(latents, item.noise[k: k + 1], timestep,
                                                         {n: v[None] for n, v in item.texts.items()}))
                    count += 1
        return total / count


# --------------------------------------------------------------------------- best step, early stopping


@dataclass
class BestTracker:
    """The best validation loss so far, its step and LoRA, and early stopping's count of evaluations without gain."""

    patience: int = 0
    best: float = math.inf
    best_step: int = -1
    bad: int = 0
    stopped_at: int | None = None
    best_lora: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def update(self, step: int, value: float, lora: Any) -> bool:
        """Record one evaluation (`lora`: a callable giving the weights); True when it is the new best."""
        if value < self.best:
            self.best, self.best_step, self.bad, self.best_lora = value, step, 0, lora()
            return True
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            self.stopped_at = step
        return False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict()."""
        self.__dict__.update(state)


def read_val_csv(path: Path) -> list[tuple[int, float]]:
    """(step, val_loss) rows of val_loss.csv."""
    if not path.is_file():
        return []
    rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(int(s), float(v)) for s, v in rows]


def truncate_val_csv(path: Path, upto: int) -> None:
    """Keep the rows up to step `upto` (a resumed run rewrites what follows)."""
    rows = [r for r in read_val_csv(path) if r[0] <= upto]
    path.write_text(VAL_HEADER + "".join(f"{s},{v:.8g}\n" for s, v in rows))


class ValidationCallback(L.Callback):
    """Every `val_every` optimizer steps (and at step 0): the validation loss, val_loss.csv, best step,
    early stopping and the plateau scheduler. Runs on every rank (same weights, same number)."""

    def __init__(self, valset: ValidationSet, csv_path: Path, every: int, start: int, total: int):
        self.valset, self.csv_path, self.every, self.start, self.total = valset, csv_path, every, start, total
        self.last_step = start

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.start == 0:
            self._evaluate(trainer, pl_module, 0)  # the untrained LoRA: the baseline

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self.start + trainer.global_step
        if step == self.last_step:
            return  # mid-accumulation
        self.last_step = step
        if step % self.every == 0 or step == self.total:
            self._evaluate(trainer, pl_module, step)

    def _evaluate(self, trainer: L.Trainer, module: Any, step: int) -> None:
        value = self.valset.loss(module, trainer)
        tracker: BestTracker = module.tracker
        tracker.update(step, value, module.lora_state_dict)
        if module.plateau is not None:
            module.plateau.step(value)
        if tracker.stopped_at is not None:
            trainer.should_stop = True
        if trainer.is_global_zero:
            with open(self.csv_path, "a") as f:
                f.write(f"{step},{value:.8g}\n")
