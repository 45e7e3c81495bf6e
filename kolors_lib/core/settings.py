"""The settings sections of the course config (one dataclass per step); their values live in configs/default.yaml.

`kolors_lib.core.config` builds them from the YAML files and re-exports them; import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ModelSource:
    """Where one model comes from: a ModelScope id, or a local folder that overrides it."""

    model_id: str
    local_dir: Path | None


@dataclass
class ModelsConfig:
    """The models the course uses (watermark and nsfw are optional step-02 filters)."""

    kolors: ModelSource
    vae_fp16_fix: ModelSource
    aesthetic: ModelSource
    captioner: ModelSource
    watermark: ModelSource
    nsfw: ModelSource
    cache_dir: Path | None


@dataclass
class DataConfig:
    """Step 01: where the raw images come from."""

    source: str
    dataset_id: str
    subset: str
    split: str
    default_caption: str
    max_pixels: int
    limit: int | None


@dataclass
class FilterConfig:
    """Step 02: the Data-Juicer recipe and caption rules."""

    recipe: Path
    executor: str
    num_proc: int
    trigger_word: str
    add_tags: list[str]
    remove_tags: list[str]
    # image_aesthetics_filter: keep images scoring at least this, on the challenge's 0-10 scale
    aesthetic_min_score: float
    # captioning (the recipe's kolors_caption_mapper): keep | fill | replace
    caption_mode: str
    caption_instruction: str
    caption_batch_size: int
    caption_max_new_tokens: int
    caption_max_pixels: int
    caption_device: str | None  # None: the config's device (CPU when there is no CUDA)


def lora_scale(alpha: float, rank: int) -> float:
    """The training scale alpha/rank: what LoRA strength 1.0 means everywhere (W += strength·scale·B·A)."""
    return float(alpha) / int(rank)


# step 03's optimizer and learning-rate schedule choices (recipe.py builds them)
OPTIMIZERS = ("adamw", "lion", "adafactor", "prodigy", "adamw8bit", "lion8bit")
# frozen base weights (issue 22): 16-bit, torchao int8 (CPU and CUDA), bitsandbytes NF4 (CUDA)
QUANTIZATIONS = ("none", "int8", "nf4")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "plateau")
# lora.target_modules presets (DiffSynth module names; peft matches them as name suffixes)
TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out"],  # the camp's choice
    "attn_ff": ["to_q", "to_k", "to_v", "to_out", "proj", "ff"],  # + feed-forward (GEGLU proj, out)
    "all_linear": ["to_q", "to_k", "to_v", "to_out", "proj", "ff", "proj_in", "proj_out"],
}


def target_module_list(value: str | list[str]) -> list[str]:
    """lora.target_modules as a list: a preset name (attn, attn_ff, all_linear) or the names themselves."""
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return list(TARGET_PRESETS[value])
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


@dataclass
class LoraConfig:
    """LoRA shape and strength, read by training and by inference alike."""

    rank: int
    alpha: float
    target_modules: list[str]

    def __post_init__(self) -> None:
        self.target_modules = target_module_list(self.target_modules)

    @property
    def scale(self) -> float:
        """The training scale alpha/rank: what strength 1.0 means everywhere."""
        return lora_scale(self.alpha, self.rank)


@dataclass
class TrainConfig:
    """Step 03: LoRA training settings (default.yaml's values reproduce the camp's run on `full`)."""

    steps: int
    epochs: int | None
    batch_size: int
    grad_accum: int
    learning_rate: float
    precision: str
    gradient_checkpointing: bool
    center_crop: bool
    random_flip: bool
    save_every: int
    validate_every: int
    validation_prompts: list[str]
    accelerator: str
    devices: Any
    strategy: str
    num_workers: int
    # issue 12's options (recipe.py, validation.py, buckets.py); default.yaml's values are the camp's run
    val_fraction: float
    val_files: list[str]
    val_every: int
    val_draws: int
    early_stop_patience: int
    keep_best: bool
    optimizer: str
    optimizer_args: dict[str, Any]
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    plateau_factor: float
    plateau_patience: int
    min_snr_gamma: float | None
    noise_offset: float
    buckets: bool
    bucket_max_aspect: float
    augment_variants: int
    augment_crop_scale: float
    augment_jitter: float
    ema_decay: float
    # issue 22: the frozen UNet's linear layers in none | int8 | nf4 (None: the device plan's choice)
    base_quantization: str | None


@dataclass
class GenerateConfig:
    """Step 04: the story file and how its panels are rendered."""

    story: Path
    strength: float
    add_trigger_word: bool
    # None: use the story file's values; the tiny profile sets small ones
    steps: int | None
    width: int | None
    height: int | None
    sweep_strengths: list[float]
    offload_text_encoder: bool
    base_quantization: str | None  # the storyboard UNet: none | int8 | nf4 (None: the plan's choice)
    # best-of-N (kolors_lib/selection.py): seeds drafted per scene, draft settings, the objective's weight
    candidates: int
    draft_steps: int | None
    draft_scale: float
    consistency_weight: float


@dataclass
class ScoreConfig:
    """Step 05: the challenge's aesthetic gate."""

    gate: float
