"""Checks of the settings where they enter (config file, overrides, command line), before any work starts.

A bad value fails at once with one line naming the setting, instead of a useless LoRA (steps 0), a
crash deep inside peft/torch/Lightning (rank 0, lr nan) or a render that never ends (width 99968).
"""

from __future__ import annotations

import math
from typing import Any

from kolors_lib.core.errors import ConfigError
from kolors_lib.core.settings import QUANTIZATIONS
from kolors_lib.core.yaml_files import quote

SIZE_MULTIPLE = 64  # Kolors' UNet halves the 8x-downsampled latent 3 times: pixels must divide by 64
# Kolors was trained at 1024²; attention memory and time grow with the square of the pixel count, so
# 2048 (4x the pixels of 1024²) is already ~16x the attention work: beyond it a render runs for hours on
# CPU and exceeds a 24 GB GPU, so we refuse rather than let it run until it is killed.
MAX_SIDE = 2048
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed
# a trigger word is one caption tag: a separator would split it into several tags in every caption
TAG_SEPARATORS = (",", "，", "、", ";", "；", "|", "\n", "\r", "\t")
MAX_AUGMENT_VARIANTS = 100  # each variant is one more cached VAE encoding of every image


def is_int(value: Any) -> bool:
    """True for a real int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any, name: str, *, positive: bool = False, minimum: float | None = None) -> float:
    """`value` as a finite float, else a ConfigError naming `name` (NaN and infinities are refused)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (positive and number <= 0) or (minimum is not None and number < minimum):
        need = "a finite number" + (" > 0" if positive else f" >= {minimum:g}" if minimum is not None else "")
        raise ConfigError(f"{name} must be {need}, not {quote(value)}")
    return number


def integer(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum, else a ConfigError naming `name`."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, not {quote(value)}")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63) (what torch's generators take), else a ConfigError naming `name`."""
    if not is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be an integer in [0, 2**63), not {quote(value)}")
    return int(value)


def unit_interval(value: Any, name: str) -> float:
    """A number in [0, 1) (a decay, a held-out fraction), else a ConfigError naming `name`."""
    number = finite(value, name) if not isinstance(value, bool) else math.nan
    if not 0 <= number < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), not {quote(value)}")
    return number


def output_name(value: Any, name: str) -> str:
    """A name that becomes one folder or file under an output folder: one path component, not . or .."""
    text = value if isinstance(value, str) else ""
    if (not text.strip() or text.strip(". ") == "" or "/" in text or "\\" in text or "\0" in text
            or text != text.strip()):
        raise ConfigError(f"{name} {quote(value)} must be one folder name (no '/', '\\', '..' or absolute "
                          "paths): the output stays inside its folder")
    return text


def trigger_word(value: Any, name: str = "filter.trigger_word") -> str:
    """A trigger word: one caption tag (no comma or other separator, no line break); '' for none."""
    if not isinstance(value, str) or any(sep in value for sep in TAG_SEPARATORS):
        raise ConfigError(f"{name} must be one tag (no commas, separators or line breaks: it goes first in "
                          f"every caption), not {quote(value)}")
    return value.strip()


def image_side(value: Any, name: str) -> int:
    """A width/height/resolution: a multiple of 64 between 64 and MAX_SIDE."""
    if not is_int(value) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE or value > MAX_SIDE:
        raise ConfigError(f"{name} must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} "
                          f"(Kolors' UNet needs multiples of 64; larger sides need far more memory and time "
                          f"than the course plans for), not {quote(value)}")
    return int(value)


def check_config(cfg: Any) -> Any:
    """Raise a ConfigError for the first setting of `cfg` that training or rendering could not use."""
    t, lora, gen = cfg.train, cfg.lora, cfg.generate
    seed(cfg.seed)
    image_side(cfg.resolution, "resolution")
    integer(lora.rank, "lora.rank")
    lora.alpha = finite(lora.alpha, "lora.alpha", positive=True)
    if t.epochs is None:
        integer(t.steps, "train.steps")
    else:
        t.epochs = finite(t.epochs, "train.epochs", positive=True)
    integer(t.batch_size, "train.batch_size")
    integer(t.grad_accum, "train.grad_accum")
    integer(t.save_every, "train.save_every", 0)
    integer(t.validate_every, "train.validate_every", 0)
    integer(t.num_workers, "train.num_workers", 0)
    t.learning_rate = finite(t.learning_rate, "train.learning_rate", positive=True)
    _check_train_options(t)
    integer(cfg.data.max_pixels, "data.max_pixels")
    cfg.filter.aesthetic_min_score = finite(cfg.filter.aesthetic_min_score, "filter.aesthetic_min_score")
    cfg.filter.trigger_word = trigger_word(cfg.filter.trigger_word)
    gen.strength = finite(gen.strength, "generate.strength")
    gen.sweep_strengths = [finite(s, "generate.sweep_strengths") for s in gen.sweep_strengths or []]
    for key in ("width", "height"):
        if getattr(gen, key) is not None:
            image_side(getattr(gen, key), f"generate.{key}")
    for key in ("steps", "draft_steps"):
        if getattr(gen, key) is not None:
            integer(getattr(gen, key), f"generate.{key}")
    integer(gen.candidates, "generate.candidates")
    for where, value in (("train.base_quantization", cfg.train.base_quantization),
                         ("generate.base_quantization", gen.base_quantization)):
        if value is not None and value not in QUANTIZATIONS:
            raise ConfigError(f"{where} must be one of {', '.join(QUANTIZATIONS)} or null, not {value!r}")
    cfg.score.gate = finite(cfg.score.gate, "score.gate")
    return cfg


def _check_train_options(t: Any) -> None:
    """Step 03's "going further" numbers (the camp's defaults pass): decays, fractions, counts."""
    t.ema_decay = unit_interval(t.ema_decay, "train.ema_decay")
    t.val_fraction = unit_interval(t.val_fraction, "train.val_fraction")
    if integer(t.augment_variants, "train.augment_variants", 0) > MAX_AUGMENT_VARIANTS:
        raise ConfigError(f"train.augment_variants must be at most {MAX_AUGMENT_VARIANTS} (each variant is one "
                          f"more cached VAE encoding of every image), not {t.augment_variants}")
    for key in ("val_every", "val_draws", "lr_num_cycles"):
        integer(getattr(t, key), f"train.{key}")
    for key in ("early_stop_patience", "lr_warmup_steps", "plateau_patience"):
        integer(getattr(t, key), f"train.{key}", 0)
    t.noise_offset = finite(t.noise_offset, "train.noise_offset", minimum=0)
    if t.min_snr_gamma is not None:
        t.min_snr_gamma = finite(t.min_snr_gamma, "train.min_snr_gamma", positive=True)
