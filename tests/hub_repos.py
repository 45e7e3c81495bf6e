"""The repos the loopback hub serves for the `full` profile: the real repos' file names, the tiny models' bytes.

Test helper only. Every file name of the real ModelScope repos is listed (sizes as the public repo pages
show them, rounded: the real byte counts only matter as "large"); a file the tiny writer makes is served
with its bytes, every other one is a filler (listed, never served), so a test sees at once when the course
asks for a file it must not fetch (the 10 GB fp32 UNet, the README, the duplicate weights).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from ms_download_server import Served

GB, MB, KB = 1_000_000_000, 1_000_000, 1_000
KOLORS_ID = "Kwai-Kolors/Kolors"
DATASET_ID = "AI-ModelScope/lowres_anime"
TE_SHARDS = [f"text_encoder/pytorch_model-{i:05d}-of-00007.bin" for i in range(1, 8)]
# Kwai-Kolors/Kolors on ModelScope: every file name; sizes in bytes, rounded
KOLORS_FILES = {
    ".gitattributes": 2 * KB, "MODEL_LICENSE": 8 * KB, "README.md": 12 * KB, "configuration.json": 50,
    "imgs/Kolors_paper.pdf": 10 * MB, "imgs/cn_all.png": 6 * MB, "imgs/en_all.png": 6 * MB,
    "imgs/fz_all.png": 5 * MB, "imgs/head_final3.png": 3 * MB, "imgs/logo.png": 50 * KB,
    "imgs/prompt_vis.txt": 2 * KB, "imgs/wechat.png": 60 * KB, "imgs/zl8.png": 4 * MB,
    "model_index.json": 430, "scheduler/scheduler_config.json": 600,
    "text_encoder/config.json": 1300, "text_encoder/configuration_chatglm.py": 2 * KB,
    "text_encoder/modeling_chatglm.py": 55 * KB, **{name: int(1.83 * GB) for name in TE_SHARDS[:6]},
    TE_SHARDS[6]: int(1.05 * GB), "text_encoder/pytorch_model.bin.index.json": 20 * KB,
    "text_encoder/quantization.py": 15 * KB, "text_encoder/tokenization_chatglm.py": 12 * KB,
    "text_encoder/tokenizer.model": 1 * MB, "text_encoder/tokenizer_config.json": 250,
    "text_encoder/vocab.txt": 1 * MB, "tokenizer/tokenization_chatglm.py": 12 * KB,
    "tokenizer/tokenizer.model": 1 * MB, "tokenizer/tokenizer_config.json": 250, "tokenizer/vocab.txt": 1 * MB,
    "unet/config.json": 1 * KB, "unet/diffusion_pytorch_model.fp16.safetensors": int(5.16 * GB),
    "unet/diffusion_pytorch_model.safetensors": int(10.3 * GB), "vae/config.json": 600,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167 * MB, "vae/diffusion_pytorch_model.safetensors": 335 * MB,
}
VAE_FIX_FILES = {".gitattributes": 1500, "README.md": 3 * KB, "configuration.json": 50, "config.json": 700,
                 "diffusion_pytorch_model.bin": 335 * MB, "diffusion_pytorch_model.safetensors": 335 * MB,
                 "sdxl.vae.safetensors": 335 * MB, "sdxl_vae.safetensors": 335 * MB, "images/comparison.png": 2 * MB}
AESTHETIC_FILES = {".gitattributes": 1500, "README.md": 2 * KB, "configuration.json": 50, "config.json": 5 * KB,
                   "merges.txt": 525 * KB, "model.safetensors": int(1.71 * GB), "preprocessor_config.json": 400,
                   "pytorch_model.bin": int(1.71 * GB), "special_tokens_map.json": 600, "tokenizer.json": 2 * MB,
                   "tokenizer_config.json": 900, "vocab.json": 1 * MB}
CAPTIONER_FILES = {".gitattributes": 1500, "LICENSE": 11 * KB, "README.md": 17 * KB, "configuration.json": 50,
                   "chat_template.json": 1 * KB, "config.json": 1300, "generation_config.json": 300,
                   "merges.txt": int(1.7 * MB), "model-00001-of-00002.safetensors": int(3.99 * GB),
                   "model-00002-of-00002.safetensors": int(0.43 * GB), "model.safetensors.index.json": 56 * KB,
                   "preprocessor_config.json": 350, "tokenizer.json": 7 * MB, "tokenizer_config.json": 4 * KB,
                   "vocab.json": int(2.8 * MB)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _seven_shards(text_encoder: Path) -> dict[str, bytes]:
    """The tiny ChatGLM's weights re-split under the real repo's seven shard names, with their index."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(text_encoder.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    keys = sorted(state)
    out, weight_map = {}, {}
    for i, name in enumerate(TE_SHARDS):
        part = {k: state[k] for k in keys[i::len(TE_SHARDS)]}
        buf = io.BytesIO()
        torch.save(part, buf)
        out[name] = buf.getvalue()
        weight_map.update({k: Path(name).name for k in part})
    size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    out["text_encoder/pytorch_model.bin.index.json"] = json.dumps(index, indent=2).encode()
    return out


def _two_safetensors_shards(weights: Path) -> dict[str, bytes]:
    """The tiny Qwen2-VL's weights under the real repo's two shard names, with their index."""
    from safetensors.torch import load_file, save

    state = load_file(weights)
    keys = sorted(state)
    out, weight_map = {}, {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::2]}
        out[name] = save(part, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in state.values())
    out["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                     indent=2).encode()
    return out


def _overlay(real: dict[str, int], tiny: dict[str, bytes]) -> dict[str, bytes | Served]:
    """Every real file name: the tiny bytes where the tiny writer has the file, a filler elsewhere."""
    files: dict[str, bytes | Served] = {name: Served.filler(size, name) for name, size in real.items()}
    files.update({name: data for name, data in tiny.items() if name in real})
    return files


def full_profile_repos(tiny: dict[str, Path]) -> dict[str, dict[str, bytes | Served]]:
    """The four model repos of the `full` profile, from the folders `write_tiny_kolors` returned."""
    # the pipeline's own tokenizer/ folder is not loaded (DiffSynth ships the tokenizer; the ComfyUI
    # wrapper reads text_encoder/): a filler, like every file the course never fetches
    kolors = {n: d for n, d in _files(tiny["kolors"]).items()
              if not n.startswith(("text_encoder/pytorch_model", "tokenizer/"))}
    kolors.update(_seven_shards(tiny["kolors"] / "text_encoder"))
    captioner = {n: d for n, d in _files(tiny["captioner"]).items() if n != "model.safetensors"}
    captioner.update(_two_safetensors_shards(tiny["captioner"] / "model.safetensors"))
    captioner_real = {**CAPTIONER_FILES, **{n: len(d) for n, d in captioner.items() if n not in CAPTIONER_FILES}}
    return {
        KOLORS_ID: _overlay(KOLORS_FILES, kolors),
        "AI-ModelScope/sdxl-vae-fp16-fix": _overlay(VAE_FIX_FILES, _files(tiny["vae_fp16_fix"])),
        "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE":
            _overlay(AESTHETIC_FILES, _files(tiny["aesthetic"])),
        "Qwen/Qwen2-VL-2B-Instruct": _overlay(captioner_real, captioner),
    }


def parquet_bytes(rows: list[dict]) -> bytes:
    """A parquet file of `rows` (image as {"bytes", "path"}, text), as the hub's dataset files are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def anime_rows(count: int, shade: int) -> list[dict]:
    """`count` small PNG rows captioned 二次元, as lowres_anime's are."""
    from PIL import Image

    rows = []
    for i in range(count):
        buf = io.BytesIO()
        Image.new("RGB", (48 + i, 40), (shade, 30 * i % 255, 90)).save(buf, format="PNG")
        rows.append({"image": {"bytes": buf.getvalue(), "path": f"{shade}_{i}.png"}, "text": "二次元"})
    return rows


def dataset_repo(shards: int = 2, rows: int = 3) -> dict[str, bytes | Served]:
    """A small parquet copy of lowres_anime: README and `shards` train files of `rows` rows each."""
    files: dict[str, bytes | Served] = {"README.md": b"# lowres_anime (test copy)\n"}
    for i in range(shards):
        files[f"data/train-{i:05d}-of-{shards:05d}.parquet"] = parquet_bytes(anime_rows(rows, 40 * (i + 1)))
    return files
