"""Kolors LoRA story course: one shared library that every notebook step calls."""

import warnings

# torch warns about the pynvml shim that a dependency pulls in; learners cannot act on it
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

__all__ = ["Config", "load_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`Config` and `load_config`, imported on first use: `python -m kolors_lib` can then explain a missing
    package in one line instead of a traceback from this import."""
    if name in __all__:
        from kolors_lib import config

        return getattr(config, name)
    raise AttributeError(f"module 'kolors_lib' has no attribute {name!r}")
