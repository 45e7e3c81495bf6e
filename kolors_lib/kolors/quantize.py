"""Frozen weights in 8 or 4 bits: the UNet's base under a full-precision LoRA, ChatGLM3-6B for the caches.

`int8` is torchao's weight-only int8 (one scale per output row; CPU and CUDA): each `nn.Linear` keeps its
module and its forward, and its weight becomes an int8 tensor that multiplies in the layer's compute dtype.
`nf4` is bitsandbytes' 4-bit NormalFloat (CUDA only). Only linear layers are quantised (87 % of the Kolors
UNet's parameters); convolutions, norms and embeddings keep their dtype, and nothing under a LoRA
(`lora_A`, `lora_B`) is touched, so the LoRA trains in fp32 over the quantised base exactly as over a
16-bit one and its file is the same. The device plan (`kolors_lib.core.device_plan`) decides which one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kolors_lib.core.device_plan import PADDED_VOCAB, check_quantization


def is_frozen_linear(module: torch.nn.Module, name: str) -> bool:
    """A plain (or already int8) linear layer that is not part of a LoRA (peft's lora_A / lora_B / ...)."""
    return (type(module) in (torch.nn.Linear, FrozenInt8Linear)
            and not any(part.startswith("lora_") for part in name.split(".")))


def quantize_base(model: torch.nn.Module, method: str, device: str | None = None,
                  keep: Callable[[torch.nn.Linear], bool] | None = None) -> torch.nn.Module:
    """Quantise `model`'s frozen linear layers in place (`none`: nothing) on `device`; returns `model`.

    `keep(layer)` True leaves a layer as it is. Apply LoRA first, then this: peft's layers stay plain
    `lora.Linear` over a quantised `base_layer`, so training, saving and loading the LoRA do not change.
    """
    if (check_quantization(method, device or "cpu") or "none") == "none":
        return model

    def chosen(module: torch.nn.Module, name: str) -> bool:
        return (is_frozen_linear(module, name) and not is_quantized(module.weight)
                and not (keep is not None and keep(module)))

    if method == "nf4":
        return _to_nf4(model, str(device), chosen)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layers = [m for n, m in model.named_modules() if chosen(m, n)]
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=chosen, device=device)
    for layer in layers:
        layer.__class__ = FrozenInt8Linear  # same module, weights and state-dict keys; a leaner backward
    return model


class _FrozenLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen quantised W whose backward keeps W itself, not a 16-bit copy of it.

    torchao's own linear dequantises W and lets autograd save that copy, so every layer between two
    checkpoints holds its weight in 16 bits again until the backward: measured +0.77 GiB at 1024².
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a frozen parameter: a reference, no copy
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ ctx.weight.dequantize().to(grad.dtype), None, None


class FrozenInt8Linear(torch.nn.Linear):
    """An nn.Linear over a frozen torchao int8 weight (quantize_base's int8 layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, through _FrozenLinear so the backward keeps no 16-bit weight."""
        return _FrozenLinear.apply(x, self.weight, self.bias)


def _to_nf4(model: torch.nn.Module, device: str, chosen: Callable[[torch.nn.Module, str], bool]) -> torch.nn.Module:
    """Swap the chosen linear layers for bitsandbytes Linear4bit (NF4) and quantise them on `device`."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not chosen(child, f"{parent_name}.{name}" if parent_name else name):
                continue
            assert isinstance(child, torch.nn.Linear)
            with torch.device("meta"):  # the fp16 weight comes from `child`, no second allocation
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=child.weight.dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float16), requires_grad=False,
                                             quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # bitsandbytes quantises when the weight reaches the GPU
    return model


def to_int8(model: torch.nn.Module, device: str = "cuda") -> torch.nn.Module:
    """ChatGLM3-6B in int8 on `device` (the plan's int8 text-encoder row): every linear layer but the
    65024-wide output layer, which Kolors never runs; the embeddings stay in their dtype."""
    quantize_base(model, "int8", device, keep=lambda layer: layer.out_features == PADDED_VOCAB)
    return model.to(device)


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a torchao int8 weight or a bitsandbytes 4-bit one."""
    return hasattr(tensor, "__tensor_flatten__") or type(tensor).__name__ == "Params4bit"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a quantised weight's inner tensors (int8 data, scales) and nothing else."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    extra = getattr(tensor, "quant_state", None)  # bitsandbytes NF4: absmax per 64-weight block
    absmax = getattr(extra, "absmax", None)
    return tensor.numel() * tensor.element_size() + (absmax.numel() * absmax.element_size() if absmax is not None
                                                     else 0)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers as stored (quantised ones at their real size)."""
    seen: set[int] = set()
    total = 0
    for tensor in _tensors(model.parameters(), model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def _tensors(*groups: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    for group in groups:
        yield from group


def quantized_share(model: torch.nn.Module) -> float:
    """Fraction of `model`'s linear-layer weights that are quantised (1.0 after quantize_base int8/nf4)."""
    weights = [m.weight for n, m in model.named_modules() if is_frozen_linear(m, n) or type(m).__name__ == "Linear4bit"]
    return sum(is_quantized(w) for w in weights) / max(len(weights), 1)


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """Weight memory (GiB) and the quantised share of linear layers, for benchmarks and the GPU check."""
    return {"weight_gib": round(weight_bytes(model) / 2**30, 3), "quantized_linear_share": quantized_share(model)}


__all__ = ["FrozenInt8Linear", "describe", "is_frozen_linear", "is_quantized", "quantize_base",
           "quantized_share", "tensor_bytes", "to_int8", "weight_bytes"]
