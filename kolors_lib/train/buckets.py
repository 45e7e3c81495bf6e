"""Aspect-ratio buckets for step 03: images keep their shape instead of a 1:1 crop.

A bucket list holds sizes of about resolution² pixels whose sides are multiples of 64 at 1024²
(scaled with the resolution, never below 32: the UNet halves the latents twice); each image goes to
the bucket nearest its aspect ratio, its latents are cached at that size, and every batch is drawn
from one bucket, so a batch never mixes sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Size = tuple[int, int]  # (width, height) in pixels


def bucket_step(resolution: int) -> int:
    """Side granularity: 64 at 1024², scaled with the resolution, a multiple of 32 and at least 32."""
    return max(32, round(64 * resolution / 1024 / 32) * 32)


def bucket_sizes(resolution: int, max_aspect: float = 2.0) -> list[Size]:
    """(width, height) buckets of at most resolution² pixels, sides multiples of bucket_step, aspect ≤ max_aspect."""
    step, area = bucket_step(resolution), resolution * resolution
    sizes = []
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = area // width // step * step  # the tallest that keeps the area within resolution²
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.append((width, height))
    return sizes


def nearest_bucket(width: int, height: int, sizes: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (in log scale, so 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def batch_plan(buckets: Sequence[Size], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One pass over the data as batches of sample indices, each batch from one bucket (order fixed by seed, epoch).

    A bucket with fewer images than a batch, or a last partial batch, is filled up from the start of the
    same bucket's shuffled order: a batch never mixes sizes.
    """
    g = torch.Generator().manual_seed(seed * 100_019 + epoch)
    batches = []
    for size in sorted(set(buckets)):
        members = [i for i, b in enumerate(buckets) if b == size]
        order = [members[int(j)] for j in torch.randperm(len(members), generator=g)]
        count = math.ceil(len(order) / batch_size)
        ring = order * math.ceil(count * batch_size / len(order))
        batches += [ring[k * batch_size:(k + 1) * batch_size] for k in range(count)]
    return [batches[int(j)] for j in torch.randperm(len(batches), generator=g)]
