"""A tiny random-weight Kolors written to disk in the real checkpoint layout.

The UNet and VAE reuse DiffSynth's real block classes and `forward`, rebuilt with small
channel counts from the model's own diffusers `config.json`, so the real loading code,
state-dict converters and LoRA key names apply unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from kolors_lib.compat import patch_torchvision

# Kwai-Kolors/Kolors unet/config.json (the keys our builders read, plus what diffusers needs)
KOLORS_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.27.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 5632,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

# AI-ModelScope/sdxl-vae-fp16-fix (and Kolors vae/) config.json
SDXL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.18.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# ChatGLM3-6B as Kolors ships it (text_encoder/config.json)
CHATGLM_CONFIG: dict[str, Any] = {
    "_name_or_path": "THUDM/chatglm3-6b-base",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.38.2",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

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

KOLORS_MODEL_INDEX = {
    "_class_name": "KolorsPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "force_zeros_for_empty_prompt": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
KOLORS_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "discrete",
    "use_karras_sigmas": False,
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


# ---------------------------------------------------------------- DiffSynth classes


def _unet_blocks(cfg: dict[str, Any]) -> list[torch.nn.Module]:
    """DiffSynth's 46-block SDXL UNet layout for any channel sizes in a diffusers config."""
    from diffsynth.models.sd_unet import AttentionBlock, DownSampler, PopBlock, PushBlock, ResnetBlock, UpSampler

    c0, c1, c2 = cfg["block_out_channels"]
    _, h1, h2 = cfg["attention_head_dim"]
    _, l1, l2 = cfg["transformer_layers_per_block"]
    temb, cross = 4 * c0, cfg["cross_attention_dim"]

    def R(i: int, o: int) -> torch.nn.Module:  # noqa: N802 - mirrors DiffSynth's layout listing
        return ResnetBlock(i, o, temb)

    def A1() -> torch.nn.Module:  # noqa: N802
        return AttentionBlock(h1, c1 // h1, c1, l1, cross)

    def A2() -> torch.nn.Module:  # noqa: N802
        return AttentionBlock(h2, c2 // h2, c2, l2, cross)

    P, Q = PushBlock, PopBlock  # noqa: N806
    return [
        R(c0, c0), P(), R(c0, c0), P(), DownSampler(c0), P(),
        R(c0, c1), A1(), P(), R(c1, c1), A1(), P(), DownSampler(c1), P(),
        R(c1, c2), A2(), P(), R(c2, c2), A2(), P(),
        R(c2, c2), A2(), R(c2, c2),
        Q(), R(2 * c2, c2), A2(), Q(), R(2 * c2, c2), A2(), Q(), R(c2 + c1, c2), A2(), UpSampler(c2),
        Q(), R(c2 + c1, c1), A1(), Q(), R(2 * c1, c1), A1(), Q(), R(c1 + c0, c1), A1(), UpSampler(c1),
        Q(), R(c1 + c0, c0), Q(), R(2 * c0, c0), Q(), R(2 * c0, c0),
    ]


def _init_unet(model: torch.nn.Module, cfg: dict[str, Any]) -> None:
    """Fill a DiffSynth SDXLUNet's modules for the sizes in `cfg` (Kolors variant)."""
    from diffsynth.models.sd_unet import Timesteps

    c0 = cfg["block_out_channels"][0]
    temb = 4 * c0
    model.time_proj = Timesteps(c0)
    model.time_embedding = torch.nn.Sequential(
        torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
    model.add_time_proj = Timesteps(cfg["addition_time_embed_dim"])
    model.add_time_embedding = torch.nn.Sequential(
        torch.nn.Linear(cfg["projection_class_embeddings_input_dim"], temb), torch.nn.SiLU(),
        torch.nn.Linear(temb, temb))
    model.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
    model.text_intermediate_proj = torch.nn.Linear(cfg["encoder_hid_dim"], cfg["cross_attention_dim"])
    model.blocks = torch.nn.ModuleList(_unet_blocks(cfg))
    model.conv_norm_out = torch.nn.GroupNorm(num_channels=c0, num_groups=32, eps=1e-5)
    model.conv_act = torch.nn.SiLU()
    model.conv_out = torch.nn.Conv2d(c0, 4, kernel_size=3, padding=1)
    model.is_kolors = True


def _vae_encoder_blocks(ch: list[int]) -> list[torch.nn.Module]:
    """DiffSynth's VAE encoder layout for channel sizes `ch` (4 levels)."""
    from diffsynth.models.sd_unet import DownSampler, ResnetBlock
    from diffsynth.models.sd_vae_decoder import VAEAttentionBlock

    a, b, c, d = ch
    blocks: list[torch.nn.Module] = []
    for i, (cin, cout) in enumerate(((a, a), (a, b), (b, c), (c, d))):
        blocks += [ResnetBlock(cin, cout, eps=1e-6), ResnetBlock(cout, cout, eps=1e-6)]
        if i < 3:
            blocks.append(DownSampler(cout, padding=0, extra_padding=True))
    return blocks + [ResnetBlock(d, d, eps=1e-6), VAEAttentionBlock(1, d, d, 1, eps=1e-6),
                     ResnetBlock(d, d, eps=1e-6)]


def _vae_decoder_blocks(ch: list[int]) -> list[torch.nn.Module]:
    """DiffSynth's VAE decoder layout for channel sizes `ch` (4 levels)."""
    from diffsynth.models.sd_unet import ResnetBlock, UpSampler
    from diffsynth.models.sd_vae_decoder import VAEAttentionBlock

    a, b, c, d = ch
    blocks: list[torch.nn.Module] = [ResnetBlock(d, d, eps=1e-6), VAEAttentionBlock(1, d, d, 1, eps=1e-6),
                                     ResnetBlock(d, d, eps=1e-6)]
    for i, (cin, cout) in enumerate(((d, d), (d, c), (c, b), (b, a))):
        blocks += [ResnetBlock(cin, cout, eps=1e-6), ResnetBlock(cout, cout, eps=1e-6),
                   ResnetBlock(cout, cout, eps=1e-6)]
        if i < 3:
            blocks.append(UpSampler(cout))
    return blocks


@functools.cache
def _classes_for(kind: str, key: str) -> type:
    """A DiffSynth model class rebuilt for the sizes in a (JSON-serialised) diffusers config."""
    patch_torchvision()
    from diffsynth.models.sdxl_unet import SDXLUNet
    from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    cfg = json.loads(key)
    if kind == "unet":
        def unet_init(self: torch.nn.Module, is_kolors: bool = True) -> None:
            torch.nn.Module.__init__(self)
            _init_unet(self, cfg)
        return type("SizedKolorsUNet", (SDXLUNet,), {"__init__": unet_init, "sized_config": cfg})
    ch = cfg["block_out_channels"]
    if kind == "vae_encoder":
        def enc_init(self: torch.nn.Module, upcast_to_float32: bool = True) -> None:
            torch.nn.Module.__init__(self)
            self.scaling_factor = cfg.get("scaling_factor", 0.13025)
            self.quant_conv = torch.nn.Conv2d(8, 8, kernel_size=1)
            self.conv_in = torch.nn.Conv2d(3, ch[0], kernel_size=3, padding=1)
            self.blocks = torch.nn.ModuleList(_vae_encoder_blocks(ch))
            self.conv_norm_out = torch.nn.GroupNorm(num_channels=ch[-1], num_groups=32, eps=1e-6)
            self.conv_act = torch.nn.SiLU()
            self.conv_out = torch.nn.Conv2d(ch[-1], 8, kernel_size=3, padding=1)
        return type("SizedSDXLVAEEncoder", (SDXLVAEEncoder,), {"__init__": enc_init, "sized_config": cfg})

    def dec_init(self: torch.nn.Module, upcast_to_float32: bool = True) -> None:
        torch.nn.Module.__init__(self)
        self.scaling_factor = cfg.get("scaling_factor", 0.13025)
        self.post_quant_conv = torch.nn.Conv2d(4, 4, kernel_size=1)
        self.conv_in = torch.nn.Conv2d(4, ch[-1], kernel_size=3, padding=1)
        self.blocks = torch.nn.ModuleList(_vae_decoder_blocks(ch))
        self.conv_norm_out = torch.nn.GroupNorm(num_channels=ch[0], num_groups=32, eps=1e-5)
        self.conv_act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(ch[0], 3, kernel_size=3, padding=1)
    return type("SizedSDXLVAEDecoder", (SDXLVAEDecoder,), {"__init__": dec_init, "sized_config": cfg})


def sized_class(kind: str, config: dict[str, Any]) -> type:
    """DiffSynth class (`unet`, `vae_encoder`, `vae_decoder`) for the sizes in `config`."""
    keys = ("block_out_channels", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
            "encoder_hid_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "scaling_factor")
    return _classes_for(kind, json.dumps({k: config[k] for k in keys if k in config}, sort_keys=True))


# ---------------------------------------------------------------- writing to disk


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_diffusers(model: torch.nn.Module, folder: Path, config: dict[str, Any], variant: str | None = None) -> None:
    """Write `config.json` + `diffusion_pytorch_model[.VARIANT].safetensors` as diffusers does."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if variant == "fp16" else None
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    name = f"diffusion_pytorch_model{f'.{variant}' if variant else ''}.safetensors"
    save_file(state, str(folder / name), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)


def _tokenizer_dir() -> Path:
    """The ChatGLM tokenizer files that ship inside the diffsynth wheel."""
    import diffsynth

    return Path(diffsynth.__file__).parent / "tokenizer_configs" / "kolors" / "tokenizer"


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
    _save_diffusers(model, folder, cfg)


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
    _write_json(folder / "config.json", {**cfg, **{k: v for k, v in config.items() if k in cfg}})
    for file in sorted(_tokenizer_dir().iterdir()):
        shutil.copy2(file, folder / file.name)


def write_tiny_aesthetic(folder: Path, seed: int) -> None:
    """A random tiny aesthetic predictor (CLIP vision + linear head) in its repo's layout."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    model = AestheticsPredictorV2Linear(CLIPVisionConfig(**TINY_CLIP_VISION))
    model.save_pretrained(folder)
    size = TINY_CLIP_VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder)


def write_tiny_kolors(dest: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the tiny Kolors, fp16-fix VAE and aesthetic predictor under `dest`; return their dirs."""
    patch_torchvision()
    dest = Path(dest)
    out = {"kolors": dest / "Kolors", "vae_fp16_fix": dest / "sdxl-vae-fp16-fix",
           "aesthetic": dest / "aesthetics-predictor"}
    marker = dest / "tiny-kolors.json"
    info = {"seed": seed, "unet_file": "diffusion_pytorch_model.fp16.safetensors",
            "unet": TINY_UNET, "vae": TINY_VAE, "chatglm": TINY_CHATGLM,
            "clip_vision": TINY_CLIP_VISION}
    if marker.exists() and not overwrite and json.loads(marker.read_text()) == info:
        return out
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kolors = tmp / "Kolors"
    _write_json(kolors / "model_index.json", KOLORS_MODEL_INDEX)
    _write_json(kolors / "scheduler" / "scheduler_config.json", KOLORS_SCHEDULER)
    write_tiny_unet(kolors / "unet", seed)
    write_tiny_vae(kolors / "vae", seed + 1)
    write_tiny_chatglm(kolors / "text_encoder", seed + 2)
    shutil.copytree(_tokenizer_dir(), kolors / "tokenizer")
    write_tiny_vae(tmp / "sdxl-vae-fp16-fix", seed + 3)
    write_tiny_aesthetic(tmp / "aesthetics-predictor", seed + 4)
    _write_json(tmp / "tiny-kolors.json", info)
    # swap in whole, so a half-written model folder is never picked up
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return out
