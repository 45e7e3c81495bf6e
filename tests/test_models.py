"""Model resolution: local overrides, the ModelScope cache, and a fast, clear offline failure."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from kolors_lib.config import load_config
from kolors_lib.models import ModelUnavailableError, kolors_paths, resolve_model
from kolors_lib.tiny import write_tiny_kolors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_download_fails_fast_naming_model_and_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    cfg = load_config(profile="full", workdir=tmp_path)
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        resolve_model(cfg, "kolors")
    assert time.monotonic() - start < 10
    assert "Kwai-Kolors/Kolors" in str(err.value) and "models.kolors.local_dir" in str(err.value)


def test_cli_reports_offline_model_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from kolors_lib.cli import main

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert main(["models", "--profile", "full", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download Kwai-Kolors/Kolors") and "Traceback" not in err


def test_prefilled_modelscope_cache_is_used_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    tiny = write_tiny_kolors(tmp_path / "tiny")
    cache = tmp_path / "cache"
    shutil.copytree(tiny["kolors"], cache / "Kwai-Kolors" / "Kolors")
    cfg = load_config(profile="full", workdir=tmp_path, overrides={"models": {"cache_dir": str(cache)}})
    assert kolors_paths(cfg).unet == cache / "Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.safetensors"


def test_local_override_must_be_complete(tmp_path: Path) -> None:
    tiny = write_tiny_kolors(tmp_path / "tiny")
    (tiny["kolors"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    cfg = load_config(profile="full", workdir=tmp_path,
                      overrides={"models": {"kolors": {"local_dir": str(tiny["kolors"])}}})
    with pytest.raises(ModelUnavailableError, match="missing unet/diffusion_pytorch_model.safetensors"):
        resolve_model(cfg, "kolors")


def test_tiny_profile_writes_its_models_on_first_use(tiny_cfg) -> None:
    paths = kolors_paths(tiny_cfg)
    assert paths.unet.is_file() and paths.text_encoder.is_dir()
    assert paths.root == tiny_cfg.tiny_models_dir / "Kolors"
    assert resolve_model(tiny_cfg, "aesthetic") == tiny_cfg.tiny_models_dir / "aesthetics-predictor"


def test_cli_tiny_kolors_writes_the_layout(tmp_path: Path, capsys) -> None:
    from kolors_lib.cli import main

    assert main(["tiny-kolors", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m/Kolors/unet/diffusion_pytorch_model.safetensors").is_file()
    assert str(tmp_path / "m/Kolors") in capsys.readouterr().out
