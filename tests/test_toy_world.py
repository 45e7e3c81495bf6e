"""Issue 21's plumbing, cheap: the toy world's pictures read back right, the one denoising loss noises each
sample at its own timestep, trained DiffSynth weights round-trip through diffusers' file layout, and the toy
writer is deterministic and trains once."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_lib.data.toy_world import Scene, all_scenes, draw, measure, parse
from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG, sized_class
from kolors_lib.kolors.models import load_model_manager
from kolors_lib.offline_models import toy
from kolors_lib.train.denoise import denoising_loss, make_scheduler


def test_measure_reads_back_every_scene_flat_and_ink() -> None:
    rng = np.random.default_rng(0)
    flat = [(draw(s, 64, rng), s) for s in all_scenes() + all_scenes(held_out=True)]
    assert all(measure(p).colour == s.colour and measure(p).shape == s.shape for p, s in flat)
    ink = [(draw(s, 64, rng, ink=True), s) for s in all_scenes()]
    assert all(measure(p).shape == s.shape for p, s in ink)
    # the style the LoRA is to learn is far less saturated than the base look
    assert np.mean([measure(p).saturation for p, _ in ink]) < 0.5 * np.mean([measure(p).saturation for p, _ in flat])


def test_measure_reads_a_soft_blotchy_speckled_picture_as_drawn() -> None:
    """What a small model's pictures look like: soft edges, a blotch inside the object, a stray speck."""
    from PIL import ImageFilter

    rng = np.random.default_rng(3)
    for scene in all_scenes():
        picture = draw(scene, 64, rng).filter(ImageFilter.GaussianBlur(1.5))
        pixels = np.asarray(picture).copy()
        # objects are drawn around the middle, at least 35 px across: the middle is inside every one
        pixels[30:34, 30:34] = pixels[0, 0]  # a hole of ground colour inside the object
        pixels[2:4, 2:4] = 255 - pixels[0, 0]  # a speck in a corner, far from the ground
        reading = measure(Image.fromarray(pixels))
        assert (reading.colour, reading.shape) == (scene.colour, scene.shape), (scene, reading)


def test_parse_reads_the_contract_wording_in_both_comma_forms() -> None:
    scene = Scene("红色", "圆形", "白色")
    assert scene.caption == "一个红色的圆形，白色的背景"
    assert parse("kstory, 古风，水墨画，" + scene.caption) == scene
    assert parse("kstory, 一个红色的圆形, 白色的背景") == scene
    assert parse("一个紫色的圆形，白色的背景") is None


def _toy_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return sized_class("unet", {**copy.deepcopy(KOLORS_UNET_CONFIG), **toy.TOY_UNET})().eval()


def test_one_timestep_per_sample_is_each_sample_at_its_own_timestep() -> None:
    unet, scheduler = _toy_unet(), make_scheduler()
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    texts = {"encoder_hidden_states": torch.randn((2, 7, 64), generator=g),
             "add_text_embeds": torch.randn((2, 64), generator=g)}
    t = scheduler.timesteps[torch.tensor([10, 900])]
    with torch.no_grad():
        both = denoising_loss(unet, scheduler, latents, noise, t, texts)
        each = [denoising_loss(unet, scheduler, latents[i:i + 1], noise[i:i + 1], t[i:i + 1],
                               {k: v[i:i + 1] for k, v in texts.items()}) for i in range(2)]
        same_t = denoising_loss(unet, scheduler, latents, noise, t[:1], texts)
    assert torch.allclose(both, (each[0] + each[1]) / 2, atol=1e-5)
    assert not torch.allclose(both, same_t, atol=1e-3)  # the per-sample timesteps were used


def test_trained_weights_round_trip_through_the_diffusers_layout(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = _toy_unet()
    ucfg = {**copy.deepcopy(KOLORS_UNET_CONFIG), **toy.TOY_UNET}
    toy.save_as_diffusers([unet], toy.diffusers_shapes("UNet2DConditionModel", ucfg),
                          tmp_path / "unet" / "diffusion_pytorch_model.safetensors", torch.float32)
    (tmp_path / "unet" / "config.json").write_text(json.dumps(ucfg))
    vcfg = {**copy.deepcopy(SDXL_VAE_CONFIG), **toy.TOY_VAE}
    torch.manual_seed(1)
    enc, dec = sized_class("vae_encoder", vcfg)(), sized_class("vae_decoder", vcfg)()
    toy.save_as_diffusers([enc, dec], toy.diffusers_shapes("AutoencoderKL", vcfg),
                          tmp_path / "vae" / "diffusion_pytorch_model.safetensors", torch.float32)
    (tmp_path / "vae" / "config.json").write_text(json.dumps(vcfg))
    manager = load_model_manager([tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
                                  tmp_path / "vae" / "diffusion_pytorch_model.safetensors"])
    for original, loaded in ((unet, manager.fetch_model("sdxl_unet")), (enc, manager.fetch_model("sdxl_vae_encoder")),
                             (dec, manager.fetch_model("sdxl_vae_decoder"))):
        theirs = loaded.state_dict()
        assert all(torch.equal(v, theirs[k].reshape(v.shape)) for k, v in original.state_dict().items())
    # diffusers' own class reads the same file with every weight present
    UNet2DConditionModel.from_pretrained(tmp_path / "unet")


def test_the_toy_writer_is_deterministic_and_trains_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in {"pictures": 16, "vae_steps": 2, "vae_batch": 2, "unet_steps": 2, "unet_batch": 2}.items():
        monkeypatch.setitem(toy.RECIPE, key, value)  # a short recipe: the same code, seconds instead of minutes
    first = toy.write_toy_kolors(tmp_path / "a", load_model_manager, seed=3)
    assert "training the toy Kolors once" in capsys.readouterr().out
    unet = first["kolors"] / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    stamp = unet.stat().st_mtime_ns
    assert toy.write_toy_kolors(tmp_path / "a", load_model_manager, seed=3) == first
    assert unet.stat().st_mtime_ns == stamp and "training" not in capsys.readouterr().out
    second = toy.write_toy_kolors(tmp_path / "b", load_model_manager, seed=3)
    for rel in ("Kolors/unet/diffusion_pytorch_model.fp16.safetensors",
                "Kolors/vae/diffusion_pytorch_model.safetensors"):
        assert (first["kolors"].parent / rel).read_bytes() == (second["kolors"].parent / rel).read_bytes()
