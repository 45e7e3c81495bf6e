"""Environment fixes applied once, before heavy imports: CPU torchvision, offline hubs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator

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


# HF `datasets` and `huggingface_hub` phone home (jsonl loads, model lookups) unless these are set
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
# ...and read them once, at import, into these module constants
_OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                      ("datasets.config", "HF_DATASETS_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode"))


def set_offline_env() -> None:
    """Offline hubs for this whole process: only for a worker process that exists for one Data-Juicer run."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def offline_hubs() -> Iterator[None]:
    """HF `datasets`, `huggingface_hub` and `transformers` make no network calls inside the block; the
    environment and those libraries' offline switches are put back afterwards (a later step may download)."""
    import datasets.config  # noqa: F401 - loaded now, so their import-time switches are restored after
    import huggingface_hub.constants

    outside = bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    saved_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    saved = {(mod, attr): getattr(sys.modules[mod], attr) for mod, attr in _OFFLINE_CONSTANTS if mod in sys.modules}
    os.environ.update(OFFLINE_ENV)
    for mod, attr in _OFFLINE_CONSTANTS:
        if mod in sys.modules:
            setattr(sys.modules[mod], attr, True)
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for mod, attr in _OFFLINE_CONSTANTS:
            if mod in sys.modules:  # also a module first imported inside the block
                setattr(sys.modules[mod], attr, saved.get((mod, attr), outside))
