"""The real Kolors architecture: its published configs, and DiffSynth's classes rebuilt for any size.

The configs are those Kwai-Kolors/Kolors and sdxl-vae-fp16-fix ship. DiffSynth's UNet/VAE classes
hard-code the real channel counts; `sized_class` rebuilds the same block layout (so the same
`forward` and parameter names) from a diffusers `config.json`, which is how a model of another size
(the course's tiny one, or a resized research model) loads through the real code path.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision

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


# ---------------------------------------------------------------- DiffSynth classes


# Kwai-Kolors/Kolors model_index.json and scheduler/scheduler_config.json, as published
KOLORS_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "KolorsPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "force_zeros_for_empty_prompt": False,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["kolors", "ChatGLMModel"],
    "tokenizer": ["kolors", "ChatGLMTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
KOLORS_SCHEDULER: dict[str, Any] = {
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


def chatglm_tokenizer_dir() -> Path:
    """The ChatGLM tokenizer files that ship inside the diffsynth wheel (Kolors' tokenizer/ folder)."""
    import diffsynth

    return Path(diffsynth.__file__).parent / "tokenizer_configs" / "kolors" / "tokenizer"


def copy_chatglm_tokenizer(folder: Path) -> None:
    """Copy the tokenizer files next to ChatGLM's weights, as Kolors ships its text_encoder/ folder."""
    for file in sorted(chatglm_tokenizer_dir().iterdir()):
        shutil.copy2(file, folder / file.name)


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


NUM_TRAIN_TIMESTEPS = 1100  # Kolors' scheduler (DiffSynth switches to it for ChatGLM models)
BETA_END = 0.014


def kolors_scheduler() -> Any:
    """The scheduler DiffSynth's pipeline switches to for Kolors (and its trainer uses)."""
    patch_torchvision()
    from diffsynth.schedulers import EnhancedDDIMScheduler

    return EnhancedDDIMScheduler(beta_end=BETA_END, num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def lora_param_count(rank: int, target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out")) -> int:
    """LoRA parameters on the real Kolors UNet: rank*(in+out) per targeted Linear (meta device, no memory)."""
    patch_torchvision()
    from diffsynth.models.sdxl_unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in target_modules)
