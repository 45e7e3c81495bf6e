"""ComfyUI custom nodes: Load Kolors Story LoRA (for ComfyUI-KwaiKolorsWrapper). See README.md."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
