"""A parsed LoRA merged into a UNet at a strength, repeatably (for sweeps), or applied unmerged over int8/nf4."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from kolors_lib.core.checks import finite
from kolors_lib.kolors.quantize import is_quantized

if TYPE_CHECKING:
    from kolors_lib.kolors.lora import LoraPair, LoraSpec

__all__ = ["LoraMerger", "checked_strength"]


def checked_strength(value: Any) -> float:
    """A LoRA strength: finite (NaN would render black panels); a negative one works but gets a notice."""
    strength = finite(value, "strength")
    if strength < 0:
        print(f"NOTICE: strength {strength:g} is negative: the LoRA's style is subtracted, not added",
              file=sys.stderr)
    return strength


class LoraMerger:
    """Merges a LoRA into a UNet at a strength; `set(s)` again moves to strength s (for sweeps).

    keep_base=True keeps a CPU copy of the targeted weights, so every `set` is bit-identical to a fresh
    merge; without it (no extra memory, for one-strength renders) the previous delta is subtracted
    first, equal to a fresh merge up to float rounding. Over int8/nf4 weights, which cannot take
    W += ΔW, the LoRA stays unmerged: each adapted layer adds strength·scale·B·A·x to its output.
    """

    def __init__(self, unet: torch.nn.Module, lora: LoraSpec, keep_base: bool = False) -> None:
        from kolors_lib.kolors.lora import check_lora_fits

        self.unet, self.lora = unet, lora
        self.pairs = lora.pairs
        check_lora_fits(unet, self.pairs)  # raises LoraMismatchError naming keys, before any denoising
        params = dict(unet.named_parameters())
        self.unmerged = any(is_quantized(params[f"{m}.weight"]) for m in self.pairs)
        self._base = ({m: params[f"{m}.weight"].detach().to("cpu", copy=True) for m in self.pairs}
                      if keep_base and not self.unmerged else None)
        self._hooks: list[Any] = []
        self.strength = 0.0

    def set(self, strength: float) -> None:
        """W = W_base + strength·(alpha/rank)·B·A, exactly as export.merge_pairs computes it."""
        from kolors_lib.kolors.lora import merge_pairs

        strength = float(strength)
        if self.unmerged:
            if not self._hooks:
                modules = dict(self.unet.named_modules())
                self._hooks = [modules[m].register_forward_hook(self._adder(pair)) for m, pair in self.pairs.items()]
            self.strength = strength
            return
        if self.strength != 0.0:
            if self._base is None:  # undo the previous merge with the same arithmetic
                merge_pairs(self.unet, self.pairs, -self.strength)
            else:
                params = dict(self.unet.named_parameters())
                with torch.no_grad():
                    for module, weight in self._base.items():
                        params[f"{module}.weight"].copy_(weight)
        if strength != 0.0:
            merge_pairs(self.unet, self.pairs, strength)
        self.strength = strength

    def _adder(self, pair: LoraPair) -> Any:
        """A forward hook adding strength·scale·B·(A·x) (B, A cast once to the input's device and dtype)."""
        cast: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor]] = {}

        def add(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self.strength == 0.0:
                return None
            x = inputs[0]
            key = (x.device, x.dtype)
            if key not in cast:
                cast.clear()
                cast[key] = (pair.down.to(x.device, x.dtype), pair.up.to(x.device, x.dtype))
            down, up = cast[key]
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
            return output + (self.strength * pair.scale) * delta.to(output.dtype)

        return add
