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
