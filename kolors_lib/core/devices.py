"""Which torch device a step runs on: the configured one when this machine has it, else the CPU."""

from __future__ import annotations


def resolve_device(device: str | None) -> str:
    """`device` when it exists here, else "cpu" (a cuda config on a CPU-only machine; None means cpu)."""
    import torch

    name = str(device or "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return name
