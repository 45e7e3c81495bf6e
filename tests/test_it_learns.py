"""Issue 12's honest "it learns" check: a LoRA trained on a few pictures lowers their deterministic
validation loss clearly, and one trained on no real data (grey pictures under the same captions)
does not. Runs on the toy Kolors (profile toy: VAE and UNet trained on a toy world by the course's own
code, once per machine): on a random UNet every LoRA learns the same generic correction, whatever it is shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from kolors_lib.core.config import Config, load_config
from kolors_lib.core.inputs import training_overrides
from kolors_lib.kolors.models import kolors_paths
from kolors_lib.train.cache import build_cache
from kolors_lib.train.lora_module import KolorsLoraModule
from kolors_lib.train.training import train_lora
from kolors_lib.train.validation import ValidationSet
from tests.train_sets import write_train_set

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("KOLORS_LEARN") != "1",
                                 reason="trains the toy Kolors once (~11 CPU-min), then ~1 min: make learn")]

RES = 64
CAPTIONS = ["kstory, a red square on black", "kstory, a blue disc on white",
            "kstory, green and white stripes", "kstory, a yellow and black checkerboard"]
LORA = {"rank": 8, "alpha": 8, "target_modules": "attn_ff"}
RECIPE = {**LORA, "steps": 120, "batch_size": 4, "lr": 3e-3, "save_every": 0, "gradient_checkpointing": False}


def pictures(s: int = RES) -> list[Image.Image]:
    """Four pictures unlike the pretraining shapes: a square, a disc, stripes, a checkerboard."""
    square = Image.new("RGB", (s, s), "black")
    ImageDraw.Draw(square).rectangle([s // 4, s // 4, 3 * s // 4, 3 * s // 4], fill="red")
    disc = Image.new("RGB", (s, s), "white")
    ImageDraw.Draw(disc).ellipse([s // 6, s // 6, 5 * s // 6, 5 * s // 6], fill="blue")
    stripes = Image.new("RGB", (s, s), "white")
    for y in range(0, s, s // 4):
        ImageDraw.Draw(stripes).rectangle([0, y, s, y + s // 8 - 1], fill="green")
    board = Image.new("RGB", (s, s), "black")
    for i in range(4):
        for j in range(4):
            if (i + j) % 2:
                ImageDraw.Draw(board).rectangle([i * s // 4, j * s // 4, (i + 1) * s // 4 - 1,
                                                 (j + 1) * s // 4 - 1], fill="yellow")
    return [square, disc, stripes, board]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Config:
    cfg = load_config(profile="toy", workdir=tmp_path_factory.mktemp("toy") / "workdir")
    kolors_paths(cfg)  # the toy Kolors: trained once per machine, then copied
    return cfg


def _val_loss(cfg: Config, valset: ValidationSet, lora: Path | None) -> float:
    module = KolorsLoraModule.from_config(training_overrides(cfg, LORA))
    if lora is not None:
        module.load_lora_state_dict(load_file(str(lora)))
    return valset.loss(module)


def test_a_lora_learns_its_pictures_and_not_from_no_data(pretrained: Config, tmp_path: Path) -> None:
    right = write_train_set(pretrained, tmp_path / "right", pictures(), CAPTIONS, RES)
    report = build_cache(right)
    valset = ValidationSet(report, report.samples, seed=0, draws=8)  # their own pictures, fixed noise
    untrained = _val_loss(right, valset, None)
    grey = write_train_set(pretrained, tmp_path / "grey", [Image.new("RGB", (RES, RES), "gray")] * 4,
                           CAPTIONS, RES)
    losses = {}
    for name, cfg in {"right": right, "grey": grey}.items():
        losses[name] = _val_loss(right, valset, train_lora(cfg, **RECIPE).lora_path)
    print("validation loss", untrained, losses)
    assert losses["right"] < 0.95 * untrained, "training on the pictures did not lower their loss clearly"
    assert losses["grey"] > untrained, "a LoRA trained on no data lowered the loss: the check is blind"
    assert losses["right"] < 0.9 * losses["grey"]
