"""Shared fixtures: a tiny-profile config in a fresh work dir, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kolors_lib.core.config import Config, load_config  # noqa: E402


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    """A `tiny` profile config whose work dir is a fresh temporary folder."""
    return load_config(profile="tiny", workdir=tmp_path / "workdir")


@pytest.fixture(scope="session")
def tiny_unet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the tiny Kolors UNet (`Kolors/unet/`), written once per test session."""
    from kolors_lib.offline_models.tiny import write_tiny_unet

    root = tmp_path_factory.mktemp("tiny-unet")
    write_tiny_unet(root / "Kolors/unet", seed=0)  # the UNet write_tiny_kolors(root, seed=0) writes
    return root


@pytest.fixture(scope="session")
def tiny_step02_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny aesthetic predictor and captioning VLM write_tiny_kolors writes, written once per session."""
    from kolors_lib.offline_models.tiny import write_tiny_aesthetic
    from kolors_lib.offline_models.tiny_vlm import write_tiny_vlm

    root = tmp_path_factory.mktemp("tiny-step02")
    write_tiny_aesthetic(root / "aesthetics-predictor", seed=42 + 4)
    return {"aesthetic": root / "aesthetics-predictor", "captioner": write_tiny_vlm(root / "Qwen2-VL-2B-Instruct", 47)}


@pytest.fixture
def step02_cfg(tmp_path: Path, tiny_step02_models: dict[str, Path]) -> Config:
    """`tiny_cfg` with the session's tiny step-02 models (nothing else written to the work dir)."""
    models = {k: {"local_dir": str(v)} for k, v in tiny_step02_models.items()}
    return load_config(profile="tiny", workdir=tmp_path / "workdir", overrides={"models": models})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny matrices run faster, and far faster on a busy 2-core machine
    (two OpenMP threads stall badly when another process holds a core). Modules opt in with usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet_inputs() -> tuple[torch.Tensor, ...]:
    """One seeded call's inputs for the tiny Kolors UNet: latent 16², ChatGLM states, time ids, pooled."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    text = torch.randn(1, 7, 64, generator=gen)
    pooled = torch.randn(1, 64, generator=gen)
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]])
    return sample, torch.tensor([500]), text, time_ids, pooled
