"""Shared fixtures: a tiny-profile config in a fresh work dir, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from kolors_lib.config import Config, load_config  # noqa: E402


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    """A `tiny` profile config whose work dir is a fresh temporary folder."""
    return load_config(profile="tiny", workdir=tmp_path / "workdir")


@pytest.fixture(scope="session")
def tiny_unet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the tiny Kolors UNet (`Kolors/unet/`), written once per test session."""
    from kolors_lib.tiny import write_tiny_unet

    root = tmp_path_factory.mktemp("tiny-unet")
    write_tiny_unet(root / "Kolors/unet", seed=0)  # the UNet write_tiny_kolors(root, seed=0) writes
    return root
