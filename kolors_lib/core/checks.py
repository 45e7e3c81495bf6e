"""Checks of the settings where they enter (config file, overrides, command line), before any work starts.

A bad value fails at once with one line naming the setting, instead of a useless LoRA (steps 0), a
crash deep inside peft/torch/Lightning (rank 0, lr nan) or a render that never ends (width 99968).
"""

from __future__ import annotations

import math
from typing import Any

from kolors_lib.core.errors import ConfigError
from kolors_lib.core.settings import QUANTIZATIONS

SIZE_MULTIPLE = 64  # Kolors' UNet halves the 8x-downsampled latent 3 times: pixels must divide by 64
# Kolors was trained at 1024²; attention memory and time grow with the square of the pixel count, so
# 2048 (4x the pixels of 1024²) is already ~16x the attention work: beyond it a render runs for hours on
# CPU and exceeds a 24 GB GPU, so we refuse rather than let it run until it is killed.
MAX_SIDE = 2048


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
        raise ConfigError(f"{name} must be {need}, not {value!r}")
    return number


def integer(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum, else a ConfigError naming `name`."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def image_side(value: Any, name: str) -> int:
    """A width/height/resolution: a multiple of 64 between 64 and MAX_SIDE."""
    if not is_int(value) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE or value > MAX_SIDE:
        raise ConfigError(f"{name} must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} "
                          f"(Kolors' UNet needs multiples of 64; larger sides need far more memory and time "
                          f"than the course plans for), not {value!r}")
    return int(value)


def check_config(cfg: Any) -> Any:
    """Raise a ConfigError for the first setting of `cfg` that training or rendering could not use."""
    t, lora, gen = cfg.train, cfg.lora, cfg.generate
    integer(cfg.seed, "seed", 0)
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
    integer(cfg.data.max_pixels, "data.max_pixels")
    gen.strength = finite(gen.strength, "generate.strength")
    gen.sweep_strengths = [finite(s, "generate.sweep_strengths") for s in gen.sweep_strengths or []]
    for key in ("width", "height"):
        if getattr(gen, key) is not None:
            image_side(getattr(gen, key), f"generate.{key}")
    if gen.steps is not None:
        integer(gen.steps, "generate.steps")
    for where, value in (("train.base_quantization", t.base_quantization),
                         ("generate.base_quantization", gen.base_quantization)):
        if value is not None and value not in QUANTIZATIONS:
            raise ConfigError(f"{where} must be one of {', '.join(QUANTIZATIONS)} or null, not {value!r}")
    cfg.score.gate = finite(cfg.score.gate, "score.gate")
    return cfg
