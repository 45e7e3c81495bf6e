"""The real-size random Kolors: streamed files that the real loaders read; the rehearsal (slow, opt-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kolors_lib.offline_models.fullsize import random_tensor, stream_safetensors, write_full_vae

ROOT = Path(__file__).resolve().parent.parent


def test_streamed_safetensors_read_back_exactly(tmp_path: Path) -> None:
    shapes = {"a.weight": (3, 5), "a.bias": (5,), "norm.weight": (7,), "b.weight": (2, 3, 1, 1)}
    path = tmp_path / "x.safetensors"
    stream_safetensors(path, shapes, lambda n, s: random_tensor(n, s, seed=1))
    back = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in back.items()} == shapes
    assert all(v.dtype == torch.float16 for v in back.values())
    assert torch.equal(back["a.weight"], random_tensor("a.weight", (3, 5), seed=1))  # deterministic per name
    assert not torch.equal(back["a.weight"], random_tensor("a.weight", (3, 5), seed=2))
    assert back["norm.weight"].eq(1).all() and back["a.bias"].eq(0).all()


def test_full_vae_is_recognised_by_diffsynth_as_the_real_sdxl_vae(tmp_path: Path) -> None:
    from kolors_lib.kolors.models import load_model_manager

    write_full_vae(tmp_path / "vae", seed=0)
    assert json.loads((tmp_path / "vae/config.json").read_text())["block_out_channels"] == [128, 256, 512, 512]
    manager = load_model_manager([tmp_path / "vae/diffusion_pytorch_model.safetensors"])
    decoder = manager.fetch_model("sdxl_vae_decoder")
    assert type(decoder).__name__ == "SDXLVAEDecoder"  # DiffSynth's own class, found by the key hash
    assert sum(p.numel() for p in decoder.parameters()) == 49_490_199


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KOLORS_REHEARSE") != "1", reason="heavy (17 GB of weights): make rehearse")
def test_rehearsal_runs_every_notebook_on_the_full_size_model(tmp_path: Path) -> None:
    models = Path(os.environ.get("KOLORS_REHEARSE_MODELS", ROOT / "workdir" / "full-kolors"))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "rehearse.py"), "--models", str(models),
                          "--workdir", str(tmp_path / "wd")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "wd" / "rehearsal.json").read_text())
    assert [r["phase"][:2] for r in result["phases"]] == ["01", "02", "03", "04", "05", "06"]
    assert max(r["peak_rss_gib"] for r in result["phases"]) <= 24
    # the bound: 30 minutes on 2 cores once the weights are written (more cores only help)
    assert result["seconds_notebooks"] <= 30 * 60
    manifest = json.loads((tmp_path / "wd" / "storyboard" / "manifest.json").read_text())
    assert manifest["base_model"]["folder"].startswith(str(models))
    assert len(manifest["panels"]) == 8
