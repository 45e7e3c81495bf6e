"""Kolors LoRA story course: one shared library that every notebook step calls.

The learner's face is one import line, one folder per course step behind it::

    from kolors_lib import (load_config, import_dataset, filter_dataset, train_lora, render_storyboard,
                            render, score_folder, publish)
"""

import warnings

# torch warns about the pynvml shim that a dependency pulls in; learners cannot act on it
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

_HOMES = {
    "Config": "core.config", "load_config": "core.config",
    "import_dataset": "data.importer",            # step 01
    "filter_dataset": "clean.pipeline",           # step 02
    "train_lora": "train.training",               # step 03
    "render_storyboard": "storyboard.storyboard",  # step 04
    "render": "storyboard.storyboard",
    "score_folder": "score.scoring",              # step 05
    "publish": "publishing.publish",                 # step 06
}
__all__ = list(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """The learner's names, imported on first use: `python -m kolors_lib --help` stays fast and can explain a
    missing package in one line instead of a traceback from this import."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"kolors_lib.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'kolors_lib' has no attribute {name!r}")
