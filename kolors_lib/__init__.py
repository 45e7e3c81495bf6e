"""Kolors LoRA story course: one shared library that every notebook step calls."""

import warnings

# torch warns about the pynvml shim that a dependency pulls in; learners cannot act on it
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from kolors_lib.config import Config, load_config  # noqa: E402

__all__ = ["Config", "load_config"]
__version__ = "0.1.0"
