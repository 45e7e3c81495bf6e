"""Environment fixes applied once, before heavy imports: CPU torchvision, offline hubs."""

from __future__ import annotations

import importlib.util
import os

_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_state: dict[str, object] = {}


def torchvision_needs_shim() -> bool:
    """True when torchvision's compiled ops cannot load (a CUDA wheel beside a CPU torch)."""
    import torch

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing the op registry
        return False
    except (AttributeError, RuntimeError):
        pass
    # PyPI only has CUDA builds of torchvision; their _C library needs CUDA torch.
    return torch.version.cuda is None


def patch_torchvision() -> bool:
    """Define the two op schemas torchvision checks at import, so its pure-Python parts work.

    Only done when needed (CPU torch with a CUDA torchvision wheel); returns whether it was.
    """
    if "torchvision" in _state:
        return bool(_state["torchvision"])
    needed = torchvision_needs_shim()
    if needed:
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OPS:
            lib.define(schema)
        _state["torchvision_lib"] = lib  # the library object must stay alive
    _state["torchvision"] = needed
    return needed


def offline_hub_env() -> None:
    """Stop HF `datasets`/`huggingface_hub` from phoning home while Data-Juicer loads jsonl."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
