"""The tiny Kolors: real layout, real key names, real loading path, agrees with diffusers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG, sized_class
from kolors_lib.kolors.models import KolorsPaths, load_model_manager
from kolors_lib.offline_models.tiny import write_tiny_kolors

patch_torchvision()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_kolors(root, seed=0)
    return root


def _meta(cls: type, **kwargs: object) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = cls(**kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sized_builders_rebuild_the_real_diffsynth_models_exactly() -> None:
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    assert _meta(sized_class("unet", KOLORS_UNET_CONFIG)) == _meta(SDXLUNet, is_kolors=True)
    assert _meta(sized_class("vae_encoder", SDXL_VAE_CONFIG)) == _meta(SDXLVAEEncoder)
    assert _meta(sized_class("vae_decoder", SDXL_VAE_CONFIG)) == _meta(SDXLVAEDecoder)


def test_tiny_unet_has_the_real_kolors_key_names(tiny_dir: Path) -> None:
    from diffsynth.models.sdxl_unet import SDXLUNet

    manager = load_model_manager(KolorsPaths.from_root(tiny_dir / "Kolors").files())
    unet = manager.fetch_model("sdxl_unet")
    real = _meta(SDXLUNet, is_kolors=True)
    tiny = {k: v.shape for k, v in unet.state_dict().items()}
    assert isinstance(unet, SDXLUNet)
    assert sorted(tiny) == sorted(real)
    assert any(tiny[k] != real[k] for k in tiny), "tiny shapes should differ from the real ones"
    # the names a LoRA attaches to, in DiffSynth's naming (blocks 7..41)
    assert "blocks.7.transformer_blocks.0.attn1.to_q.weight" in tiny
    assert "blocks.41.transformer_blocks.1.attn2.to_out.weight" in tiny
    assert sum(v.numel() for v in unet.state_dict().values()) < 20_000_000


def test_layout_matches_kwai_kolors_repo(tiny_dir: Path) -> None:
    kolors = tiny_dir / "Kolors"
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                 "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/pytorch_model.bin.index.json", "text_encoder/tokenizer.model",
                 "text_encoder/tokenizer_config.json", "tokenizer/tokenizer.model"):
        assert (kolors / name).is_file(), name
    index = json.loads((kolors / "text_encoder/pytorch_model.bin.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((kolors / "text_encoder" / s).is_file() for s in shards)
    assert json.loads((kolors / "text_encoder/config.json").read_text())["architectures"] == ["ChatGLMModel"]
    assert (tiny_dir / "sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_dir / "aesthetics-predictor/config.json").is_file()
    assert (tiny_dir / "aesthetics-predictor/preprocessor_config.json").is_file()


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_kolors(tmp_path / "a", seed=0)["kolors"]
    other = write_tiny_kolors(tmp_path / "b", seed=1)["kolors"]
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert _sha(again / unet) == _sha(tiny_dir / "Kolors" / unet)
    assert _sha(again / "vae/diffusion_pytorch_model.safetensors") == _sha(
        tiny_dir / "Kolors/vae/diffusion_pytorch_model.safetensors")
    assert _sha(other / unet) != _sha(tiny_dir / "Kolors" / unet)


def test_rewrite_is_skipped_when_unchanged(tiny_dir: Path) -> None:
    unet = tiny_dir / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"
    before = unet.stat().st_mtime_ns
    write_tiny_kolors(tiny_dir, seed=0)
    assert unet.stat().st_mtime_ns == before


def test_models_written_before_the_vae_calibration_are_rewritten(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    write_tiny_kolors(root, seed=0)
    marker = root / "tiny-kolors.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k != "vae_latent_std"}
    marker.write_text(json.dumps(old))  # what a work dir from before the calibration holds
    vae = root / "sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors"
    before = vae.stat().st_mtime_ns
    write_tiny_kolors(root, seed=0)
    assert vae.stat().st_mtime_ns != before and json.loads(marker.read_text())["vae_latent_std"] == 1.0


def test_tiny_unet_agrees_with_diffusers_unet(tiny_dir: Path) -> None:
    """diffusers' own UNet2DConditionModel, loaded from the same folder, gives the same output."""
    from diffusers import UNet2DConditionModel

    unet_file = tiny_dir / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"
    ours = load_model_manager([unet_file]).fetch_model("sdxl_unet")
    theirs = UNet2DConditionModel.from_pretrained(tiny_dir / "Kolors/unet", variant="fp16").eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 7, 64, generator=gen)
    pooled = torch.randn(2, 64, generator=gen)
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)
    t = torch.tensor([500])
    with torch.no_grad():
        a = ours(sample, t, text, time_ids, pooled)
        b = theirs(sample, t, encoder_hidden_states=text,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert a.shape == (2, 4, 16, 16)
    assert a.abs().mean() > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tiny_vae_agrees_with_diffusers_vae(tiny_dir: Path) -> None:
    from diffusers import AutoencoderKL

    manager = load_model_manager([tiny_dir / "sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors"])
    encoder, decoder = manager.fetch_model("sdxl_vae_encoder"), manager.fetch_model("sdxl_vae_decoder")
    theirs = AutoencoderKL.from_pretrained(tiny_dir / "sdxl-vae-fp16-fix").eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = encoder(image)
        expected = theirs.encode(image).latent_dist.mean * theirs.config.scaling_factor
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
        decoded = decoder(latents)
        torch.testing.assert_close(decoded, theirs.decode(latents / theirs.config.scaling_factor).sample,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vae", ["Kolors/vae", "sdxl-vae-fp16-fix"])
def test_tiny_vae_latents_spread_like_the_real_vaes(tiny_dir: Path, vae: str) -> None:
    # A random encoder gave scaled latents of std ~0.04: pictures were invisible next to the unit noise
    # of training, so no test on the tiny model could tell one training picture from another.
    manager = load_model_manager([tiny_dir / vae / "diffusion_pytorch_model.safetensors"])
    encoder = manager.fetch_model("sdxl_vae_encoder")
    g = torch.Generator().manual_seed(7)  # other pictures than the calibration's
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 8, 8, generator=g) * 2 - 1, size=(64, 64),
                                             mode="bilinear")
    with torch.no_grad():
        latents = encoder(images)
    assert 0.5 < float(latents.std()) < 2.0
    assert float(latents.std(dim=0).mean()) > 0.25  # pictures differ, not only their common offset


def test_pipeline_generates_deterministic_images(tiny_dir: Path) -> None:
    import numpy as np
    from diffsynth import SDXLImagePipeline

    manager = load_model_manager(KolorsPaths.from_root(tiny_dir / "Kolors").files())
    pipe = SDXLImagePipeline.from_model_manager(manager)
    kwargs = {"prompt": "古风，水墨画，一个黑色长发少女", "negative_prompt": "模糊", "cfg_scale": 4.0,
              "num_inference_steps": 3, "height": 128, "width": 128}
    a = np.asarray(pipe(seed=1, **kwargs))
    b = np.asarray(pipe(seed=1, **kwargs))
    c = np.asarray(pipe(seed=2, **kwargs))
    assert a.shape == (128, 128, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all() and a.std() > 0


def test_tiny_text_encoder_is_finite(tiny_dir: Path) -> None:
    from diffsynth.models.kolors_text_encoder import ChatGLMModel

    model = ChatGLMModel.from_pretrained(tiny_dir / "Kolors/text_encoder")
    ids = torch.tensor([[64790, 64792, 100, 200, 300]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert torch.isfinite(out.hidden_states[-2]).all()


def test_aesthetic_predictor_loads_and_scores(tiny_dir: Path) -> None:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from PIL import Image
    from transformers import CLIPImageProcessor

    folder = tiny_dir / "aesthetics-predictor"
    model = AestheticsPredictorV2Linear.from_pretrained(folder).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.new("RGB", (100, 80), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        score = model(**inputs).logits
    assert score.shape == (1, 1) and torch.isfinite(score).all()


def test_real_size_configs_give_the_checkpoints_diffsynth_recognises() -> None:
    """Our Kolors UNet / SDXL VAE configs reproduce the real files' keys and shapes exactly.

    DiffSynth identifies the real Kwai-Kolors UNet and the SDXL VAE by an md5 of their
    state-dict keys with shapes; a diffusers model built from our configs hashes the same.
    """
    from diffsynth.configs.model_config import model_loader_configs
    from diffsynth.models.utils import hash_state_dict_keys
    from diffusers import AutoencoderKL, UNet2DConditionModel

    known = {row[1]: row[2] for row in model_loader_configs}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in KOLORS_UNET_CONFIG.items() if k[0] != "_"})
        vae = AutoencoderKL.from_config({k: v for k, v in SDXL_VAE_CONFIG.items() if k[0] != "_"})
    assert known[hash_state_dict_keys(unet.state_dict(), with_shape=True)] == ["sdxl_unet"]
    assert known[hash_state_dict_keys(vae.state_dict(), with_shape=True)] == ["sdxl_vae_encoder", "sdxl_vae_decoder"]
    assert sum(p.numel() for p in unet.parameters()) == 2_579_458_820


def test_loading_keeps_diffsynth_chatter_out_of_the_notebook(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    manager = load_model_manager([tiny_dir / "Kolors/unet/diffusion_pytorch_model.fp16.safetensors"])
    assert "Loading models from" not in capsys.readouterr().out
    assert "Loading models from" in manager.load_log and manager.model_name == ["sdxl_unet"]
