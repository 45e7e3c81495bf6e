"""Step-02 outputs written directly for training tests: train/ pictures + DiffSynth's metadata.csv."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from kolors_lib.core.config import Config, load_config


def random_pictures(shapes: Sequence[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """Noise pictures of the given (width, height)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in shapes]


def write_train_dir(train_dir: Path, pictures: Sequence[Image.Image], captions: Sequence[str]) -> None:
    """img_N.png for each picture and metadata.csv (file_name,text) pairing it with its caption."""
    train_dir.mkdir(parents=True, exist_ok=True)
    with open(train_dir / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, (picture, caption) in enumerate(zip(pictures, captions, strict=True)):
            picture.save(train_dir / f"img_{i}.png")
            writer.writerow([f"img_{i}.png", caption])


def write_train_set(base: Config, workdir: Path, pictures: Sequence[Image.Image], captions: Sequence[str],
                    resolution: int) -> Config:
    """A tiny-profile work dir using `base`'s models whose step-02 output holds `pictures` with `captions`."""
    cfg = dataclasses.replace(load_config(profile="tiny", workdir=workdir), models=base.models,
                              resolution=resolution)
    write_train_dir(cfg.train_dir, pictures, captions)
    return cfg
