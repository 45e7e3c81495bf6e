"""A tiny random-weight Kolors written to disk in the real checkpoint layout.

The UNet and VAE reuse DiffSynth's real block classes and `forward`, rebuilt with small
channel counts from the model's own diffusers `config.json`, so the real loading code,
state-dict converters and LoRA key names apply unchanged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.files import write_json
from kolors_lib.kolors.architecture import CHATGLM_CONFIG, KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG, copy_chatglm_tokenizer
from kolors_lib.offline_models.fullsize import RandomKolors, write_predictor_processor, write_random_kolors

# The tiny sizes: channels are multiples of 32 (GroupNorm(32)); the block layout, layer
# counts and therefore every parameter name stay those of the real model.
TINY_UNET = {
    "block_out_channels": [32, 64, 96],
    "attention_head_dim": [1, 2, 3],
    "cross_attention_dim": 64,
    "encoder_hid_dim": 64,
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 64 + 6 * 32,
    "sample_size": 16,
}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64], "sample_size": 128}
TINY_CHATGLM = {
    "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "kv_channels": 16,
    "num_attention_heads": 4, "multi_query_group_num": 2, "seq_length": 256, "torch_dtype": "float32",
}
TINY_CLIP_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 8, "projection_dim": 32,
}

def tiny_unet_config() -> dict[str, Any]:
    """Kolors' UNet config with the tiny sizes."""
    return {**copy.deepcopy(KOLORS_UNET_CONFIG), **TINY_UNET}


def tiny_vae_config() -> dict[str, Any]:
    """The SDXL VAE config with the tiny sizes."""
    return {**copy.deepcopy(SDXL_VAE_CONFIG), **TINY_VAE}


def tiny_chatglm_config() -> dict[str, Any]:
    """ChatGLM3-6B's config with the tiny sizes."""
    return {**copy.deepcopy(CHATGLM_CONFIG), **TINY_CHATGLM}


# ---------------------------------------------------------------- writing to disk


def _save_diffusers(model: torch.nn.Module, folder: Path, config: dict[str, Any], variant: str | None = None) -> None:
    """Write `config.json` + `diffusion_pytorch_model[.VARIANT].safetensors` as diffusers does."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if variant == "fp16" else None
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    name = f"diffusion_pytorch_model{f'.{variant}' if variant else ''}.safetensors"
    save_file(state, str(folder / name), metadata={"format": "pt"})
    write_json(config, folder / "config.json")


def write_tiny_unet(folder: Path, seed: int) -> None:
    """A random tiny Kolors UNet in diffusers layout (built by diffusers itself), as the fp16 variant file
    that the course downloads (unet/diffusion_pytorch_model.fp16.safetensors)."""
    from diffusers import UNet2DConditionModel

    cfg = tiny_unet_config()
    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    _save_diffusers(model, folder, cfg, variant="fp16")


def write_tiny_vae(folder: Path, seed: int) -> None:
    """A random tiny SDXL VAE in diffusers layout."""
    from diffusers import AutoencoderKL

    cfg = tiny_vae_config()
    torch.manual_seed(seed)
    model = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    calibrate_latent_scale(model, cfg["scaling_factor"])
    _save_diffusers(model, folder, cfg)


def calibrate_latent_scale(vae: torch.nn.Module, scaling_factor: float, seed: int = 0) -> float:
    """Scale a random VAE's encoder so that scaled latents spread like the real SDXL VAE's (std 1).

    A random encoder's latents are ~30x too small: pictures would be invisible next to the noise,
    and no training on the tiny model could tell one image from another. Returns the factor applied.
    """
    g = torch.Generator().manual_seed(seed)
    # smooth pictures in [-1, 1]: coarse random colours upsampled, like photos' low frequencies
    images = torch.nn.functional.interpolate(torch.rand((8, 3, 4, 4), generator=g) * 2 - 1, size=(64, 64),
                                             mode="bilinear", align_corners=False)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        factor = float(1.0 / (scaling_factor * mean.std()))
        rows = mean.shape[1]  # quant_conv gives (mean, logvar): only the mean rows change
        vae.quant_conv.weight[:rows] *= factor
        vae.quant_conv.bias[:rows] *= factor
    return factor


def write_tiny_chatglm(folder: Path, seed: int) -> None:
    """A random tiny ChatGLM3 with Kolors' config keys, sharded like the real one, plus tokenizer."""
    patch_torchvision()
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    cfg = tiny_chatglm_config()
    torch.manual_seed(seed)
    model = ChatGLMModel(ChatGLMConfig(**cfg), empty_init=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # ChatGLM leaves RMSNorm weights as torch.empty: give them their trained-model scale
            if name.endswith("layernorm.weight"):
                param.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=False, max_shard_size="8MB")
    config = json.loads((folder / "config.json").read_text())
    write_json({**cfg, **{k: v for k, v in config.items() if k in cfg}}, folder / "config.json")
    copy_chatglm_tokenizer(folder)


def write_tiny_aesthetic(folder: Path, seed: int) -> None:
    """A random tiny aesthetic predictor (CLIP vision + linear head) in its repo's layout."""
    patch_torchvision()  # transformers' CLIP model imports torchvision
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    torch.manual_seed(seed)
    model = AestheticsPredictorV2Linear(CLIPVisionConfig(**TINY_CLIP_VISION))
    model.save_pretrained(folder)
    write_predictor_processor(folder, TINY_CLIP_VISION["image_size"])


def write_tiny_kolors(dest: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the tiny Kolors, fp16-fix VAE, aesthetic predictor and captioning VLM under `dest`; return their dirs."""
    from kolors_lib.offline_models.tiny_vlm import TINY_VLM, write_tiny_vlm

    patch_torchvision()
    info = {"seed": seed, "unet_file": "diffusion_pytorch_model.fp16.safetensors",
            "unet": TINY_UNET, "vae": TINY_VAE, "chatglm": TINY_CHATGLM,
            "clip_vision": TINY_CLIP_VISION, "vlm": TINY_VLM, "aesthetic_tokenizer": True,
            "vae_latent_std": 1.0}  # models written before the VAE calibration are rewritten
    tiny = RandomKolors("tiny", write_tiny_unet, write_tiny_vae, write_tiny_chatglm, write_tiny_aesthetic, info,
                        extra={"captioner": ("Qwen2-VL-2B-Instruct", write_tiny_vlm)})
    return write_random_kolors(dest, tiny, seed, overwrite)
