"""Augmentation that survives step 03's cache: a few random crop + colour-jitter variants per image.

Each variant is fixed by (seed, image bytes, variant number), encoded once with the original, and
training draws one of them (or the original) at random per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class Augment:
    """One cached variant of an image: a random crop (same aspect ratio) and colour jitter."""

    seed: int
    crop_scale: float = 0.8  # smallest crop side as a fraction of the image's
    jitter: float = 0.1  # brightness/contrast/saturation factors in [1-j, 1+j], hue shift in [-j/4, j/4]

    def __call__(self, image: Image.Image) -> Image.Image:
        """The variant of `image` (PIL in, PIL out)."""
        from torchvision.transforms import functional as F

        g = torch.Generator().manual_seed(self.seed)

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(1, generator=g))

        width, height = image.size
        side = uniform(self.crop_scale, 1.0)
        w, h = max(1, round(width * side)), max(1, round(height * side))
        left, top = round(uniform(0, width - w)), round(uniform(0, height - h))
        image = image.crop((left, top, left + w, top + h))
        j = self.jitter
        image = F.adjust_brightness(image, uniform(1 - j, 1 + j))
        image = F.adjust_contrast(image, uniform(1 - j, 1 + j))
        image = F.adjust_saturation(image, uniform(1 - j, 1 + j))
        return F.adjust_hue(image, uniform(-j / 4, j / 4))


def variant_seed(seed: int, content: str, variant: int) -> int:
    """The seed of one variant of one image (content: the image's hash)."""
    return seed * 1_000_033 + int(content[:8], 16) * 31 + variant
