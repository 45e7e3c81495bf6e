"""Model resolution: local overrides, the ModelScope cache, and a fast, clear offline failure."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from kolors_lib.core.config import load_config
from kolors_lib.core.downloads import RepoFile, select
from kolors_lib.core.errors import ModelUnavailableError
from kolors_lib.kolors.models import ALLOW_PATTERNS, kolors_paths, load_model_manager, resolve_model
from kolors_lib.offline_models.tiny import write_tiny_kolors


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
    from kolors_lib.cli.main import main

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
    assert kolors_paths(cfg).unet == cache / "Kwai-Kolors/Kolors/unet/diffusion_pytorch_model.fp16.safetensors"
    manager = load_model_manager([kolors_paths(cfg).unet], dtype=torch.float16)  # DiffSynth takes the variant
    assert next(manager.fetch_model("sdxl_unet").parameters()).dtype == torch.float16


def test_download_takes_the_fp16_unet_the_comfyui_wrapper_loads() -> None:
    """The allow list (globs; a tuple takes the first alternative the hub has) against Kwai-Kolors/Kolors' files."""
    repo = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/config.json",
            "text_encoder/pytorch_model-00001-of-00007.bin", "text_encoder/tokenizer.model",
            "tokenizer/tokenizer.model", "README.md", "imgs/cat_and_dog.png"]
    taken = {f.path for f in select([RepoFile(p, 1, None) for p in repo], ALLOW_PATTERNS["kolors"])}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in taken
    assert "unet/diffusion_pytorch_model.safetensors" not in taken  # the unused 10 GB fp32 copy
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "text_encoder/pytorch_model-00001-of-00007.bin"} <= taken  # what the wrapper reads too
    assert not taken & {"README.md", "imgs/cat_and_dog.png", "tokenizer/tokenizer.model"}


def test_an_older_download_with_only_the_fp32_unet_still_loads(tmp_path: Path) -> None:
    tiny = write_tiny_kolors(tmp_path / "tiny")
    unet = tiny["kolors"] / "unet"
    (unet / "diffusion_pytorch_model.fp16.safetensors").rename(unet / "diffusion_pytorch_model.safetensors")
    cfg = load_config(profile="full", workdir=tmp_path,
                      overrides={"models": {"kolors": {"local_dir": str(tiny["kolors"])}}})
    assert kolors_paths(cfg).unet == unet / "diffusion_pytorch_model.safetensors"
    assert load_model_manager([kolors_paths(cfg).unet]).fetch_model("sdxl_unet") is not None


def test_the_tiny_unet_loads_as_the_comfyui_wrapper_loads_it(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    tiny = write_tiny_kolors(tmp_path / "tiny")
    unet = UNet2DConditionModel.from_pretrained(tiny["kolors"] / "unet", variant="fp16", low_cpu_mem_usage=True)
    assert unet.config.projection_class_embeddings_input_dim == 64 + 6 * 32
    with pytest.raises(OSError):  # no fp32 copy: the folder holds the variant only, as the download does
        UNet2DConditionModel.from_pretrained(tiny["kolors"] / "unet")


def test_local_override_must_be_complete(tmp_path: Path) -> None:
    tiny = write_tiny_kolors(tmp_path / "tiny")
    (tiny["kolors"] / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    cfg = load_config(profile="full", workdir=tmp_path,
                      overrides={"models": {"kolors": {"local_dir": str(tiny["kolors"])}}})
    with pytest.raises(ModelUnavailableError, match="missing unet/diffusion_pytorch_model.fp16.safetensors or "
                                                    "unet/diffusion_pytorch_model.safetensors"):
        resolve_model(cfg, "kolors")


def test_tiny_profile_writes_its_models_on_first_use(tiny_cfg) -> None:
    paths = kolors_paths(tiny_cfg)
    assert paths.unet.is_file() and paths.text_encoder.is_dir()
    assert paths.root == tiny_cfg.tiny_models_dir / "Kolors"
    assert resolve_model(tiny_cfg, "aesthetic") == tiny_cfg.tiny_models_dir / "aesthetics-predictor"


def test_cli_tiny_kolors_writes_the_layout(tmp_path: Path, capsys) -> None:
    from kolors_lib.cli.main import main

    assert main(["tiny-kolors", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m/Kolors/unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert str(tmp_path / "m/Kolors") in capsys.readouterr().out
