"""A real-size random-weight Kolors (and aesthetic predictor) written in the exact Kwai-Kolors/Kolors layout.

Same files, names, shapes and configs as the course's ModelScope download (UNet 2.58 B as the
fp16 variant file, ChatGLM3-6B in 7 .bin shards with its index and tokenizer, both VAEs,
scheduler, model_index) plus the aesthetic predictor at CLIP ViT-L/14 size, deterministic from a
seed and loaded by the same code as the real one. Every tensor is drawn on its own (seeded by
seed and name) and streamed to disk in fp16, so peak RAM stays near one ChatGLM shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.files import atomic_path, save_torch, staged_folder, write_json
from kolors_lib.kolors.architecture import (
    CHATGLM_CONFIG,
    KOLORS_MODEL_INDEX,
    KOLORS_SCHEDULER,
    KOLORS_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    chatglm_tokenizer_dir,
    copy_chatglm_tokenizer,
)

# shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE config.json: CLIP ViT-L/14 vision tower
CLIP_VIT_L14_CONFIG: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05, "num_channels": 3,
}
CHATGLM_SHARDS = 7  # text_encoder/pytorch_model-0000N-of-00007.bin, as in Kwai-Kolors/Kolors
WEIGHT_STD = 0.02  # random weights N(0, 0.02), norms 1, biases 0: finite activations through every layer
POOL_SIZE = (1 << 26) + 7  # 64 M draws (128 MB fp16); odd length so windows of equal tensors differ
_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def CLIP_VIT_L14() -> Any:  # noqa: N802 - named after the model
    """The aesthetic predictor's CLIPVisionConfig at real size."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**CLIP_VIT_L14_CONFIG)


@functools.cache
def _pool(seed: int) -> torch.Tensor:
    """POOL_SIZE fp16 draws from N(0, WEIGHT_STD) for `seed`: every weight is a window of it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(POOL_SIZE, generator=gen, dtype=torch.float32).mul_(WEIGHT_STD).to(torch.float16)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One deterministic tensor for parameter `name`: norms 1, biases 0, weights N(0, WEIGHT_STD).

    Weights are windows of one random pool, starting where the name's hash points: drawing
    8.8 B fresh numbers would take most of an hour on 2 cores; copying takes seconds.
    """
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight" or leaf in ("gamma",):
        return torch.ones(shape, dtype=dtype)
    if leaf in ("bias", "beta"):
        return torch.zeros(shape, dtype=dtype)
    pool = _pool(seed)
    n = int(torch.Size(shape).numel())
    start = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % POOL_SIZE
    pieces, taken = [], 0
    while taken < n:
        piece = pool[start:start + n - taken]
        pieces.append(piece)
        taken += piece.numel()
        start = 0
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(shape).to(dtype, copy=True)


def stream_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make: Any,
                       dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file one tensor at a time (`make(name, shape)` gives each), atomically."""
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = size * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            f.write(make(name, shape).to(dtype).contiguous().view(torch.uint8).numpy().tobytes())


def _meta_shapes(build: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_model(folder: Path, cls_name: str, config: dict[str, Any], seed: int, file_name: str) -> None:
    patch_torchvision()  # diffusers' model imports reach torchvision
    import diffusers

    cls = getattr(diffusers, cls_name)
    shapes = _meta_shapes(lambda: cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}))
    stream_safetensors(folder / file_name, shapes, lambda n, s: random_tensor(n, s, seed))
    write_json(config, folder / "config.json")


def write_full_unet(folder: Path, seed: int) -> None:
    """Kolors' UNet (2.58 B) as unet/diffusion_pytorch_model.fp16.safetensors + config.json."""
    _diffusers_model(folder, "UNet2DConditionModel", KOLORS_UNET_CONFIG, seed,
                     "diffusion_pytorch_model.fp16.safetensors")


def write_full_vae(folder: Path, seed: int) -> None:
    """The SDXL VAE (83 M) as diffusion_pytorch_model.safetensors (fp16 values) + config.json."""
    _diffusers_model(folder, "AutoencoderKL", SDXL_VAE_CONFIG, seed, "diffusion_pytorch_model.safetensors")


def _chatglm_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("inv_freq"):  # RoPE frequencies are computed, not learned
        dim = 2 * shape[0]
        return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return random_tensor(name, shape, seed)


def write_full_chatglm(folder: Path, seed: int) -> None:
    """ChatGLM3-6B (6.24 B) as Kolors ships it: config, 7 fp16 .bin shards + index, tokenizer files."""
    patch_torchvision()
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    shapes = _meta_shapes(lambda: ChatGLMModel(ChatGLMConfig(**CHATGLM_CONFIG), empty_init=False))
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    per_shard = -(-total // CHATGLM_SHARDS)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        n = 2 * torch.Size(shape).numel()
        if used + n > per_shard and shards[-1] and len(shards) < CHATGLM_SHARDS:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        state = {n: _chatglm_tensor(n, shapes[n], seed).to(torch.float16) for n in names}
        save_torch(state, folder / file)
        weight_map.update({n: file for n in names})
        del state
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / "pytorch_model.bin.index.json")
    write_json(CHATGLM_CONFIG, folder / "config.json")
    copy_chatglm_tokenizer(folder)


def write_full_aesthetic(folder: Path, seed: int) -> None:
    """The aesthetic predictor at real size (CLIP ViT-L/14 + MLP head) in its repo's layout."""
    patch_torchvision()
    from aesthetics_predictor import AestheticsPredictorV2Linear

    config = CLIP_VIT_L14()
    shapes = _meta_shapes(lambda: AestheticsPredictorV2Linear(config))
    stream_safetensors(folder / "model.safetensors", shapes, lambda n, s: random_tensor(n, s, seed))
    config.architectures = ["AestheticsPredictorV2Linear"]
    config.save_pretrained(folder)
    write_predictor_processor(folder, CLIP_VIT_L14_CONFIG["image_size"])


def write_predictor_processor(folder: Path, size: int) -> None:
    """The predictor's image processor and CLIP tokenizer: Data-Juicer loads a whole CLIPProcessor."""
    patch_torchvision()  # transformers' image utils import torchvision
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        folder)
    write_clip_tokenizer(folder)


def write_clip_tokenizer(folder: Path) -> None:
    """A minimal CLIP tokenizer: the real repo has one, and Data-Juicer loads a full CLIPProcessor."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["<|startoftext|>", "<|endoftext|>", *(f"{c}</w>" for c in letters), *letters]
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({w: i for i, w in enumerate(words)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    CLIPTokenizer(str(vocab), str(merges)).save_pretrained(folder)


Writer = Callable[[Path, int], None]  # (folder, seed) -> writes one model there


@dataclass(frozen=True)
class RandomKolors:
    """One size of random Kolors: its writers, and what its marker file records."""

    size: str  # "tiny" or "full": the marker is <size>-kolors.json
    unet: Writer
    vae: Writer
    chatglm: Writer
    aesthetic: Writer
    info: dict[str, Any]  # a marker with exactly this content means the set is already written
    extra: dict[str, tuple[str, Writer]] = field(default_factory=dict)  # key -> (folder, writer)


def write_random_kolors(dest: str | Path, kind: RandomKolors, seed: int, overwrite: bool) -> dict[str, Path]:
    """Write Kolors, the fp16-fix VAE, the aesthetic predictor (and extras) of one size; return their dirs."""
    dest = Path(dest)
    out = {"kolors": dest / "Kolors", "vae_fp16_fix": dest / "sdxl-vae-fp16-fix",
           "aesthetic": dest / "aesthetics-predictor"}
    out.update({key: dest / folder for key, (folder, _) in kind.extra.items()})
    marker = dest / f"{kind.size}-kolors.json"
    if marker.exists() and not overwrite and json.loads(marker.read_text()) == kind.info:
        return out
    # swap in whole, so a half-written model folder is never picked up
    with staged_folder(dest) as tmp:
        kolors = tmp / "Kolors"
        write_json(KOLORS_MODEL_INDEX, kolors / "model_index.json")
        write_json(KOLORS_SCHEDULER, kolors / "scheduler" / "scheduler_config.json")
        kind.unet(kolors / "unet", seed)
        kind.vae(kolors / "vae", seed + 1)
        kind.chatglm(kolors / "text_encoder", seed + 2)
        shutil.copytree(chatglm_tokenizer_dir(), kolors / "tokenizer")
        kind.vae(tmp / "sdxl-vae-fp16-fix", seed + 3)
        kind.aesthetic(tmp / "aesthetics-predictor", seed + 4)
        for offset, (folder, writer) in enumerate(kind.extra.values(), start=5):
            writer(tmp / folder, seed + offset)
        write_json(kind.info, tmp / marker.name)
    return out


def write_full_kolors(dest: str | Path, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the real-size random Kolors, fp16-fix VAE and aesthetic predictor under `dest` (~17 GB)."""
    # "layout" changes when the files written change, so an older folder is rewritten
    info = {"seed": seed, "size": "full", "weights": "fp16", "std": WEIGHT_STD, "pool": POOL_SIZE, "layout": 2}
    full = RandomKolors("full", write_full_unet, write_full_vae, write_full_chatglm, write_full_aesthetic, info)
    return write_random_kolors(dest, full, seed, overwrite)
