"""Find the model folders (ModelScope download or local override) and load them into DiffSynth."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_lib.core.compat import patch_torchvision
from kolors_lib.core.config import Config
from kolors_lib.core.console import step_log
from kolors_lib.core.downloads import Pattern, fetch_repo, hub_listing, human_size, recorded_copy
from kolors_lib.core.errors import DownloadError, ModelUnavailableError
from kolors_lib.core.settings import ModelSource

# The UNet as ComfyUI-KwaiKolorsWrapper (diffusers variant="fp16") and the course load it: 5 GB,
# not the unused 10 GB fp32 copy. A folder holding only the fp32 file (an older download) still works.
UNET_FP16 = "unet/diffusion_pytorch_model.fp16.safetensors"
UNET_FP32 = "unet/diffusion_pytorch_model.safetensors"
# What must be inside each model folder for it to count as complete (a tuple: any one of them).
REQUIRED_FILES = {
    "kolors": ("unet/config.json", (UNET_FP16, UNET_FP32), "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json"),
    "vae_fp16_fix": ("config.json", "diffusion_pytorch_model.safetensors"),
    "aesthetic": ("config.json",),
    "captioner": ("config.json", "preprocessor_config.json", "tokenizer_config.json", "generation_config.json"),
}
# the models `python -m kolors_lib models` fetches (watermark and nsfw are never downloaded)
DOWNLOADED = ("kolors", "vae_fp16_fix", "aesthetic", "captioner")
ALLOW_PATTERNS: dict[str, list[Pattern]] = {
    # only what the course (and the ComfyUI wrapper) loads: the fp16 UNet, not the 10 GB fp32 one (a tuple takes
    # the first the hub has); not the fp16 VAE, the pipeline's own tokenizer/ folder, ChatGLM's .py files, imgs/
    "kolors": ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", (UNET_FP16, UNET_FP32),
               "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
               "text_encoder/pytorch_model*.bin", "text_encoder/pytorch_model.bin.index.json",
               "text_encoder/tokenizer.model", "text_encoder/tokenizer_config.json", "text_encoder/vocab.txt"],
    "vae_fp16_fix": ["config.json", "diffusion_pytorch_model.safetensors"],
    # one copy of the weights (safetensors when the repo has it), the CLIP processor's files
    "aesthetic": ["config.json", ("model.safetensors", "pytorch_model.bin"), "preprocessor_config.json",
                  "merges.txt", "vocab.json", "special_tokens_map.json", "tokenizer_config.json"],
    "captioner": ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                  "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer.json",
                  "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                  "special_tokens_map.json"],
}


@dataclass
class KolorsPaths:
    """The files DiffSynth loads for Kolors."""

    root: Path
    text_encoder: Path
    unet: Path
    vae: Path

    @classmethod
    def from_root(cls, root: Path) -> KolorsPaths:
        """Paths inside a folder in the layout of Kwai-Kolors/Kolors."""
        fp32_only = (root / UNET_FP32).is_file() and not (root / UNET_FP16).is_file()
        unet = root / (UNET_FP32 if fp32_only else UNET_FP16)
        return cls(root, root / "text_encoder", unet, root / "vae" / "diffusion_pytorch_model.safetensors")

    def files(self) -> list[Path]:
        """ChatGLM, UNet and VAE, in the order `load_model_manager` takes them."""
        return [self.text_encoder, self.unet, self.vae]


def _missing(folder: Path, key: str) -> list[str]:
    def present(names: str | tuple[str, ...]) -> bool:
        return any((folder / n).exists() for n in ((names,) if isinstance(names, str) else names))

    return [n if isinstance(n, str) else " or ".join(n) for n in REQUIRED_FILES[key] if not present(n)]


def _override_hint(key: str) -> str:
    return (f"set models.{key}.local_dir in your config (or pass local_dir=...) to a folder that "
            f"already holds it")


def resolve_model(cfg: Config, key: str) -> Path:
    """Return the local folder of model `key` (kolors, vae_fp16_fix, aesthetic, captioner), downloading if needed."""
    source: ModelSource = getattr(cfg.models, key)
    if source.local_dir is not None:
        folder = Path(source.local_dir)
        if cfg.profile in ("tiny", "toy") and not folder.exists():
            ensure_tiny_models(cfg)
        missing = _missing(folder, key) if folder.is_dir() else ["(the folder itself)"]
        if missing:
            raise ModelUnavailableError(
                f"{source.model_id}: local folder {folder} is incomplete, missing {', '.join(missing)}")
        return folder
    with step_log(cfg, "00_models"):  # the client's own log lines go to the log, the bars to the console
        return download_model(source.model_id, key, model_cache(cfg))


def model_cache(cfg: Config) -> Path:
    """Where ModelScope downloads go: models.cache_dir, else <workdir>/models/modelscope."""
    return Path(cfg.models.cache_dir or cfg.models_dir / "modelscope")


def download_model(model_id: str, key: str, cache_dir: Path) -> Path:
    """The files of `key`'s allow list from ModelScope; a complete local copy is used without the network."""
    folder = fetch_repo(model_id, cache_dir, ALLOW_PATTERNS[key], _override_hint(key),
                        complete=lambda f: not _missing(f, key))
    missing = _missing(folder, key)
    if missing:
        raise DownloadError(f"{model_id}: download in {folder} lacks {', '.join(missing)}; {_override_hint(key)}")
    return folder


def download_plan(cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """What `models --dry-run` prints: per model, the files its allow list takes with the hub's sizes; the total."""
    lines, total = [], 0
    for key in keys:
        source: ModelSource = getattr(cfg.models, key)
        if source.local_dir is not None:
            lines.append(f"{source.model_id}: local folder {source.local_dir} (models.{key}.local_dir), no download")
            continue
        patterns: list[Pattern] = ALLOW_PATTERNS[key]
        if recorded_copy(model_cache(cfg), source.model_id, patterns) is not None:
            lines.append(f"{source.model_id}: already downloaded in {model_cache(cfg)}, no download")
            continue
        files = hub_listing(source.model_id, patterns, _override_hint(key))
        size = sum(f.size for f in files)
        total += size
        lines.append(f"{source.model_id}: {len(files)} files, {size:,} bytes ({human_size(size)})")
        lines.extend(f"  {f.size:>15,}  {f.path}" for f in files)
    lines.append(f"total to download: {total:,} bytes ({human_size(total)})")
    return lines


def ensure_tiny_models(cfg: Config) -> dict[str, Path]:
    """Write the tiny random-weight models (profile tiny) or the trained toy ones (profile toy) where the
    profile expects them (once)."""
    if cfg.profile == "toy":
        from kolors_lib.offline_models.toy import toy_models

        return toy_models(cfg.toy_models_dir, load_model_manager, seed=cfg.seed)
    from kolors_lib.offline_models.tiny import write_tiny_kolors

    return write_tiny_kolors(cfg.tiny_models_dir, seed=cfg.seed)


def kolors_paths(cfg: Config) -> KolorsPaths:
    """Resolve Kolors for this profile and return the files DiffSynth needs."""
    return KolorsPaths.from_root(resolve_model(cfg, "kolors"))


def _read_config(weights: Path) -> dict:
    config = weights.parent / "config.json"
    return json.loads(config.read_text()) if config.exists() else {}


def register_sizes(manager: object, weight_files: list[Path]) -> None:
    """Teach this ModelManager the UNet/VAE files whose sizes differ from the real ones.

    DiffSynth recognises a file by a hash of its keys and shapes and builds the class with
    the real channel counts; for other sizes (the tiny model) we register the same classes
    rebuilt from the file's own config.json. Files of the real size are left to DiffSynth.
    """
    from diffsynth.models.utils import hash_state_dict_keys, load_state_dict

    from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG, sized_class

    detector = manager.model_detector[0]
    for path in weight_files:
        cfg = _read_config(path)
        kind = cfg.get("_class_name")
        if kind == "UNet2DConditionModel" and cfg["block_out_channels"] != KOLORS_UNET_CONFIG["block_out_channels"]:
            names, classes = ["sdxl_unet"], [sized_class("unet", cfg)]
        elif kind == "AutoencoderKL" and cfg["block_out_channels"] != SDXL_VAE_CONFIG["block_out_channels"]:
            names = ["sdxl_vae_encoder", "sdxl_vae_decoder"]
            classes = [sized_class("vae_encoder", cfg), sized_class("vae_decoder", cfg)]
        else:
            continue
        key_hash = hash_state_dict_keys(load_state_dict(str(path)), with_shape=True)
        if key_hash not in detector.keys_hash_with_shape_dict:
            detector.add_model_metadata(None, key_hash, names, classes, "diffusers")


def unet_skeleton(unet_weights: Path) -> torch.nn.Module:
    """The UNet that `unet_weights` will load into, built on the meta device (no memory, no weights)."""
    patch_torchvision()
    from diffsynth.models.sdxl_unet import SDXLUNet

    from kolors_lib.kolors.architecture import KOLORS_UNET_CONFIG, sized_class

    cfg = _read_config(Path(unet_weights)) or KOLORS_UNET_CONFIG
    sized = cfg.get("block_out_channels") != KOLORS_UNET_CONFIG["block_out_channels"]
    with torch.device("meta"):
        return sized_class("unet", cfg)() if sized else SDXLUNet(is_kolors=True)


def load_model_manager(files: list[Path], device: str = "cpu", dtype: torch.dtype = torch.float32) -> object:
    """A DiffSynth ModelManager with `files` loaded: the one loading path for real and tiny models."""
    patch_torchvision()
    from diffsynth import ModelManager

    manager = ModelManager(torch_dtype=dtype, device=device)
    register_sizes(manager, [f for f in files if Path(f).is_file()])
    log = io.StringIO()
    try:
        # DiffSynth prints several lines per model; keep them for when something goes wrong
        with contextlib.redirect_stdout(log):
            manager.load_models([str(f) for f in files])
    except Exception:
        print(log.getvalue(), file=sys.stderr)
        raise
    manager.load_log = log.getvalue()
    return manager
