"""Kolors LoRA story course: one shared library that every notebook step calls."""

import warnings

# torch warns about the pynvml shim that a dependency pulls in; learners cannot act on it
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

__all__ = ["Config", "load_config", "render"]
_HOMES = {"Config": "config", "load_config": "config", "render": "generation"}
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`Config`, `load_config` and `render`, imported on first use: `python -m kolors_lib` can then explain a
    missing package in one line instead of a traceback from this import."""
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"kolors_lib.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'kolors_lib' has no attribute {name!r}")
