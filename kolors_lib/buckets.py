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

from kolors_lib.encode_cache import CachedDataset, CacheReport, pick_latents

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


class BucketBatches(CachedDataset):
    """Whole training batches (one bucket each) read from the cache; batch i of the run is fixed by (seed, i).

    Use with DataLoader(batch_size=None); under DDP each rank gets whole batches.
    """

    def __init__(self, report: CacheReport, start: int, length: int, seed: int, batch_size: int,
                 random_flip: bool):
        super().__init__(report, start, length, seed, random_flip)
        self.buckets = [tuple(lat["latents"].shape[-2:]) for lat in self.latents]
        self.batch_size = batch_size
        self.per_epoch = len(batch_plan(self.buckets, batch_size, seed, 0))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        absolute = self.start + index
        plan = batch_plan(self.buckets, self.batch_size, self.seed, absolute // self.per_epoch)
        picks = plan[absolute % self.per_epoch]
        items = [{"latents": pick_latents(self.latents[p], self.seed, absolute * self.batch_size + k,
                                          self.random_flip), **self.texts[p]} for k, p in enumerate(picks)]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
