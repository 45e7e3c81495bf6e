"""Each step's inputs (files, and the train command's settings), checked before any heavy import.

The one place for the "run step NN first" errors of missing inputs: the steps call these, and the
command line calls them before importing the step, so a learner hears what is missing in a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolors_lib.core.config import Config, apply_overrides
from kolors_lib.core.errors import LoraNotFoundError, TrainingError
from kolors_lib.core.files import recover_folder
from kolors_lib.core.settings import target_module_list

__all__ = ["lora_file", "train_metadata", "training_overrides"]
_SHORT_NAMES = {"rank": "lora.rank", "alpha": "lora.alpha", "target_modules": "lora.target_modules",
                "lr": "train.learning_rate", "learning_rate": "train.learning_rate", "resolution": "resolution",
                "seed": "seed", "device": "device"}


def lora_file(path: str | Path | None, cfg: Config | None = None) -> Path:
    """The LoRA file to render with (default: step 03's); a missing file names the step that makes it."""
    if path is None and cfg is None:
        raise ValueError("lora_file needs a path or a config")
    path = Path(path) if path is not None else cfg.lora_path
    if not path.is_file():
        workdir = f" --workdir {cfg.workdir}" if cfg is not None else ""
        raise LoraNotFoundError(f"LoRA file not found: {path}; train it first with step 03: "
                                f"python -m kolors_lib train{workdir}")
    return path


def train_metadata(train_dir: Path) -> Path:
    """Step 02's train/metadata.csv (a swap killed half-way is undone first); missing: run step 02."""
    meta = recover_folder(train_dir) / "metadata.csv"
    if not meta.is_file():
        raise TrainingError(f"{meta} not found: run step 02 (data filter) first")
    return meta


def training_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """cfg with train_lora's keyword overrides (steps, batch_size..., rank, alpha, lr) by config's one route."""
    named = {_SHORT_NAMES.get(k) or (k if "." in k else f"train.{k}"): v for k, v in overrides.items()}
    cfg = apply_overrides(cfg, named)
    cfg.lora.target_modules = target_module_list(cfg.lora.target_modules)  # a preset name given as override
    return cfg
