"""Each step's input files, checked before any heavy import (torch, DiffSynth, Lightning).

The one place for the "run step NN first" errors of missing inputs: the steps call these, and the
command line calls them before importing the step, so a learner hears what is missing in a second.
"""

from __future__ import annotations

from pathlib import Path

from kolors_lib.config import Config
from kolors_lib.errors import LoraNotFoundError, TrainingError
from kolors_lib.files import recover_folder

__all__ = ["lora_file", "train_metadata"]


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
