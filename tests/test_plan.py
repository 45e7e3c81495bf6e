"""The device plan: CUDA decisions tested on CPU through hardware descriptions, and the steps that obey it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kolors_lib.core.config import Config, load_config
from kolors_lib.core.device_plan import (
    CARDS,
    PARAMS,
    PHASES,
    QUANT_TRAIN_EXTRA,
    TINY_PARAMS,
    TRAIN_1024,
    UNET_LINEAR,
    Hardware,
    Placement,
    device_plan,
)
from kolors_lib.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _full(**train: object) -> Config:
    cfg = load_config(profile="full")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train)) if train else cfg


def test_tiny_on_cpu_is_cpu_fp32_everywhere(tiny_cfg: Config) -> None:
    plan = device_plan(tiny_cfg, Hardware(False, ram_gib=24))
    assert {(p.device, p.dtype) for p in plan.placements} == {("cpu", "float32")}
    assert (plan.precision, plan.tiled_vae, plan.fits) == ("32", False, True)
    assert {p.phase for p in plan.placements} == set(PHASES)


def test_full_profile_on_a_cpu_only_machine_stays_on_the_cpu() -> None:
    plan = device_plan(_full(precision="bf16-mixed"), Hardware(False, ram_gib=24))
    assert {p.device for p in plan.placements} == {"cpu"}
    assert plan.get("train", "unet").dtype == "bfloat16"  # what the rehearsal runs
    assert plan.get("score", "aesthetic").dtype == "float32"


def test_a10_holds_everything_on_the_gpu_in_fp16() -> None:
    plan = device_plan(_full(), CARDS["A10 (24 GB, ModelScope)"])
    assert all(p.device == "cuda" for p in plan.placements)
    assert plan.get("cache-captions", "text_encoder").dtype == "float16"
    assert plan.get("train", "unet").dtype == "float16" and plan.precision == "16-mixed"
    assert not plan.tiled_vae and plan.fits


def test_t4_has_no_bf16_so_bf16_settings_train_in_fp16() -> None:
    plan = device_plan(_full(precision="bf16-mixed"), CARDS["T4 (16 GB, Colab/Kaggle)"])
    assert plan.get("train", "unet").dtype == "float16" and plan.precision == "16-mixed"
    bf16_card = device_plan(_full(precision="bf16-mixed"), Hardware.card(15, bf16=True, int8=False))
    assert bf16_card.get("train", "unet").dtype == "bfloat16" and bf16_card.precision == "bf16-mixed"
    # ChatGLM (11.6 GiB in fp16) fits alone on a 16 GB card: captions encode on the GPU
    assert plan.get("cache-captions", "text_encoder").device == "cuda" and plan.fits


@pytest.mark.parametrize("gib", [12, 8])
def test_small_cards_encode_text_on_the_cpu_or_in_8bit(gib: int) -> None:
    cpu = device_plan(_full(), Hardware.card(gib, int8=False))
    te = cpu.get("storyboard-encode", "text_encoder")
    assert (te.device, te.dtype) == ("cpu", "bfloat16") and "s/prompt" in te.note
    assert cpu.get("cache-captions", "text_encoder").device == "cpu"
    assert cpu.get("storyboard-denoise", "unet").device == "cuda"
    int8 = device_plan(_full(), Hardware.card(gib, int8=True))
    te8 = int8.get("cache-captions", "text_encoder")
    assert (te8.device, te8.dtype) == ("cuda", "int8")
    assert int8.peak_gib("cache-captions") <= int8.budget_gib


def test_an_8gb_card_renders_1024_and_says_whether_training_fits() -> None:
    plan = device_plan(_full(base_quantization="none"), CARDS["8 GB card"])  # the 16-bit base, forced
    assert plan.tiled_vae  # the untiled fp32 decode does not fit beside the UNet
    for phase in ("cache-latents", "validate", "storyboard-encode", "storyboard-denoise", "score"):
        assert plan.peak_gib(phase) <= min(plan.budget_gib, 8.0), plan.table()
    over = plan.peak_gib("train") > plan.budget_gib
    assert ("DOES NOT FIT" in plan.table()) == over and plan.fits == (not over)
    # the plan names the largest training size that fits, and a plan at that size fits the card
    assert over and plan.train_resolution == 768, plan.table()
    assert "train at 768² (resolution: 768)" in plan.table()
    assert device_plan(dataclasses.replace(_full(base_quantization="none"), resolution=768), CARDS["8 GB card"]).fits
    assert not device_plan(dataclasses.replace(_full(base_quantization="none"), resolution=832),
                           CARDS["8 GB card"]).fits
    assert device_plan(_full(), CARDS["A10 (24 GB, ModelScope)"]).train_resolution == 1024
    # without checkpointing nothing close fits
    assert not device_plan(_full(gradient_checkpointing=False), CARDS["12 GB card"]).fits


def test_an_8gb_card_trains_1024_over_the_int8_base() -> None:
    """The plan's own choice on 8 GB: the frozen UNet's linear layers in int8, the LoRA fp32; every phase fits."""
    plan = device_plan(_full(), CARDS["8 GB card"])
    unet, lora = plan.get("train", "unet"), plan.get("train", "lora")
    assert (unet.dtype, unet.compute_dtype, unet.quantization, lora.dtype) == ("int8", "float16", "int8", "float32")
    assert unet.torch_dtype == torch.float16  # loaded in fp16, then its linears quantised
    assert plan.fits and plan.train_resolution == 1024 and plan.peak_gib("train") <= plan.budget_gib, plan.table()
    sixteen = device_plan(_full(base_quantization="none"), CARDS["8 GB card"])
    saved = sixteen.get("train", "unet").gib - unet.gib
    # one byte per linear weight instead of two, less the int8 step's measured extra activations
    assert saved == pytest.approx(UNET_LINEAR / 2**30 - QUANT_TRAIN_EXTRA, abs=0.01)
    # ChatGLM for the caches and prompts: int8 on the GPU (11.7 GiB in fp16 does not fit)
    assert {(p.device, p.dtype) for p in plan.placements if p.model == "text_encoder"} == {("cuda", "int8")}
    # the storyboard's UNet fits in fp16 (tiled VAE): no quantisation where 16-bit fits
    assert plan.get("storyboard-denoise", "unet").dtype == "float16"
    # cards where the 16-bit base fits keep it
    assert device_plan(_full(), CARDS["12 GB card"]).get("train", "unet").dtype == "float16"


def test_the_smallest_cards_step_down_to_nf4_and_nf4_needs_cuda() -> None:
    cfg = _full()
    assert device_plan(cfg, Hardware.card(7.5, nf4=True)).get("train", "unet").dtype == "nf4"
    no_bnb = device_plan(cfg, Hardware.card(7.5, nf4=False))
    assert no_bnb.get("train", "unet").dtype == "int8" and not no_bnb.fits and no_bnb.train_resolution < 1024
    with pytest.raises(ConfigError, match=r"^train.base_quantization: nf4 needs a CUDA GPU .* use int8 or none$"):
        device_plan(_full(base_quantization="nf4"), Hardware(False, ram_gib=24))
    cpu = device_plan(_full(precision="bf16-mixed", base_quantization="int8"), Hardware(False, ram_gib=24))
    assert (cpu.get("train", "unet").dtype, cpu.get("train", "unet").compute_dtype) == ("int8", "bfloat16")
    assert device_plan(_full(precision="bf16-mixed"), Hardware(False, ram_gib=24)).get("train", "unet").dtype \
        == "bfloat16"  # on a CPU the plan never quantises by itself


def test_base_quantization_is_checked_where_it_enters() -> None:
    with pytest.raises(ConfigError, match="train.base_quantization must be one of none, int8, nf4 or null, not 'int4'"):
        load_config(profile="full", overrides={"train.base_quantization": "int4"})
    with pytest.raises(ConfigError, match="generate.base_quantization must be one of"):
        load_config(profile="full", overrides={"generate.base_quantization": 8})


def test_estimates_scale_with_resolution_and_rank() -> None:
    base = device_plan(_full(), CARDS["A10 (24 GB, ModelScope)"])
    cfg = _full()
    small = device_plan(dataclasses.replace(cfg, resolution=512), CARDS["A10 (24 GB, ModelScope)"])
    big_rank = device_plan(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=64)),
                           CARDS["A10 (24 GB, ModelScope)"])
    assert small.peak_gib("train") < base.peak_gib("train") < big_rank.peak_gib("train")
    assert base.get("train", "unet").gib == pytest.approx(PARAMS["unet"] * 2 / 2**30 + TRAIN_1024, abs=0.01)


def test_frozen_unet_is_fp16_when_training_is_planned_for_a_cuda_card(tiny_cfg: Config) -> None:
    """The defect: train_lora's module was built for device "cpu", so a GPU run loaded the UNet in fp32."""
    from kolors_lib.train.lora_module import KolorsLoraModule

    cfg = dataclasses.replace(tiny_cfg, device="cuda", train=dataclasses.replace(tiny_cfg.train,
                                                                                   precision="16-mixed"))
    plan = device_plan(cfg, Hardware.card(24, int8=False))
    assert plan.get("train", "unet").dtype == "float16"
    module = KolorsLoraModule.from_config(cfg, plan)
    frozen = {p.dtype for p in module.unet.parameters() if not p.requires_grad}
    trained = {p.dtype for p in module.unet.parameters() if p.requires_grad}
    assert (frozen, trained) == ({torch.float16}, {torch.float32})


def test_renderer_encodes_where_the_plan_puts_chatglm(tiny_cfg: Config) -> None:
    """ChatGLM in another dtype than the UNet (as on the CPU beside a GPU): embeddings arrive in the UNet's."""
    from kolors_lib.kolors.models import kolors_paths
    from kolors_lib.kolors.renderer import KolorsRenderer

    root = kolors_paths(tiny_cfg).root
    text = Placement("storyboard-encode", "text_encoder", "cpu", "bfloat16", 0.0)
    renderer = KolorsRenderer(root, "cpu", torch.float32, True, text)
    renderer.encode(["kstory, 山水"], [""])
    assert {v.dtype for v in renderer.cache[("kstory, 山水", True, 1, 2)].values()} == {torch.bfloat16}
    emb = renderer.pipe.encode_prompt("kstory, 山水", positive=True)
    assert {v.dtype for v in emb.values() if isinstance(v, torch.Tensor)} == {torch.float32}
    image = renderer.render("kstory, 山水", "", seed=0, steps=1, cfg_scale=2.0, width=64, height=64)
    assert image.size == (64, 64)


def test_parameter_counts_are_the_real_models() -> None:
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    from kolors_lib.core.device_plan import LORA_PARAMS_PER_RANK
    from kolors_lib.kolors.architecture import CHATGLM_CONFIG, lora_param_count
    from kolors_lib.offline_models.fullsize import CLIP_VIT_L14

    with torch.device("meta"):
        models = {"unet": SDXLUNet(is_kolors=True), "vae_encoder": SDXLVAEEncoder(),
                  "vae_decoder": SDXLVAEDecoder(),
                  "text_encoder": ChatGLMModel(ChatGLMConfig(**CHATGLM_CONFIG), empty_init=False),
                  "aesthetic": AestheticsPredictorV2Linear(CLIP_VIT_L14())}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()} == PARAMS
    linear = [m for m in models["unet"].modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.numel() for m in linear) == UNET_LINEAR  # what int8/nf4 quantise
    assert lora_param_count(1) == LORA_PARAMS_PER_RANK


def test_tiny_parameter_counts(tiny_cfg: Config) -> None:
    from kolors_lib.kolors.models import kolors_paths, load_model_manager, resolve_model

    paths = kolors_paths(tiny_cfg)
    manager = load_model_manager([paths.unet, paths.vae, paths.text_encoder])
    names = {"sdxl_unet": "unet", "sdxl_vae_encoder": "vae_encoder", "sdxl_vae_decoder": "vae_decoder",
             "kolors_text_encoder": "text_encoder"}
    counts = {names[n]: sum(p.numel() for p in m.parameters()) for n, m in zip(manager.model_name, manager.model,
                                                                                strict=True)}
    from kolors_lib.score.scoring import load_predictor

    model, _ = load_predictor(resolve_model(tiny_cfg, "aesthetic"))
    counts["aesthetic"] = sum(p.numel() for p in model.parameters())
    assert counts == TINY_PARAMS


def test_plan_command_prints_the_table_without_torch() -> None:
    code = ("import sys; from kolors_lib.cli.main import main;"
            "assert main(['plan', '--profile', 'full', '--gpu-memory', '8']) == 0;"
            "assert 'torch' not in sys.modules, 'plan imported torch'")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 10
    assert "storyboard-denoise" in out.stdout and "text_encoder" in out.stdout and "GPU peak" in out.stdout
    js = subprocess.run([sys.executable, "-m", "kolors_lib", "plan", "--profile", "full", "--gpu-memory", "16",
                         "--no-bf16", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["hardware"]["gpu_gib"] == 16 and data["hardware"]["bf16"] is False
    assert {p["dtype"] for p in data["placements"] if p["model"] == "unet"} == {"float16"}
    eight = subprocess.run([sys.executable, "-m", "kolors_lib", "plan", "--profile", "full", "--gpu-memory", "8",
                            "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    data = json.loads(eight.stdout)
    assert data["fits"] and data["resolution"] == 1024 and data["gpu_peak_gib"]["train"] <= data["budget_gib"]
    assert all(p["dtype"] for p in data["placements"])  # every row names its dtype
    train = [p for p in data["placements"] if p["phase"] == "train"]
    assert {(p["model"], p["dtype"]) for p in train} == {("unet", "int8"), ("lora", "float32")}
