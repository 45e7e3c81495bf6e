"""Kolors LoRA story course: one shared library that every notebook step calls."""

from kolors_lib.config import Config, load_config

__all__ = ["Config", "load_config"]
__version__ = "0.1.0"
