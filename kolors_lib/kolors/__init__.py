"""Kolors itself: the UNet/VAE architecture, loading models, the renderer, the LoRA file and the story file.
Every step that touches the model goes through these modules; the real and the small models load the same way."""
