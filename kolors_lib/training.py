"""Step 03: Kolors LoRA training with cached text/image encodings, on any Lightning accelerator.

The numerics are those of DiffSynth 1.1.9's stock trainer (`LightningModelForT2ILoRA` with the
Kolors example's settings): EnhancedDDIMScheduler(beta_end=0.014, 1100 steps) with
`set_timesteps(1100)`, epsilon target, one uniform timestep per batch, MSE, AdamW on peft LoRA
(gaussian init) over the UNet's to_q/to_k/to_v/to_out. What differs is where the inputs come
from: every caption is encoded once by ChatGLM and every image once by the fp16-fix VAE before
training, ChatGLM and the VAE are freed, and the steps read only the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_lib.compat import patch_torchvision
from kolors_lib.config import Config, LoraConfig
from kolors_lib.plan import Placement, Plan, device_plan, to_int8

patch_torchvision()  # lightning imports torchvision (via torchmetrics); must come first

import lightning as L  # noqa: E402

CACHE_VERSION = "1"
FINAL_NAME = "kolors_lora.safetensors"
NUM_TRAIN_TIMESTEPS = 1100  # Kolors' scheduler (DiffSynth switches to it for ChatGLM models)
BETA_END = 0.014
CKPT_KEEP = 2  # checkpoints kept on disk (LoRA + AdamW state each)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, empty dataset, bad settings)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- fingerprints


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _file_print(path: Path, chunk: int = 1 << 20) -> str:
    """Cheap content print of a (possibly 10 GB) file: size + first and last MiB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(chunk)
        f.seek(max(size - chunk, 0))
        tail = f.read(chunk)
    return _sha(str(size), head, tail)


def model_identity(path: str | Path) -> str:
    """Identity of a model file or folder (names, sizes and content prints of its files)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    return _sha(*(f"{p.relative_to(root)}:{_file_print(p)}" for p in files))[:16]


def text_key(caption: str, encoder_id: str, dtype: torch.dtype) -> str:
    """Cache key of one caption's encoding."""
    return _sha("text", CACHE_VERSION, caption, encoder_id, str(dtype))[:32]


def image_key(data: bytes, resolution: int, crop: str, flip: bool, vae_id: str, dtype: torch.dtype) -> str:
    """Cache key of one image's latents (bytes, resolution, crop mode, flip copy, VAE, dtype)."""
    return _sha("image", CACHE_VERSION, data, str(resolution), crop, str(flip), vae_id, str(dtype))[:32]


# --------------------------------------------------------------------------- settings


@dataclass
class Sample:
    """One training image: its caption and cache keys."""

    file_name: str
    text: str
    image_key: str = ""
    text_key: str = ""


def read_metadata(train_dir: Path) -> list[Sample]:
    """Rows of DiffSynth's train/metadata.csv (file_name,text)."""
    meta = Path(train_dir) / "metadata.csv"
    if not meta.is_file():
        raise TrainingError(f"{meta} not found: run step 02 (data filter) first")
    with open(meta, newline="", encoding="utf-8") as f:
        rows = [Sample(r["file_name"], r.get("text") or "") for r in csv.DictReader(f)]
    if not rows:
        raise TrainingError(f"{meta} lists no images")
    return rows


# --------------------------------------------------------------------------- caching


def load_image_tensor(path: Path, resolution: int, center_crop: bool, seed: int) -> torch.Tensor:
    """Image -> [3,R,R] in [-1,1], resized and cropped exactly like DiffSynth's TextImageDataset.

    Without center_crop the stock dataset crops at random each step; a cache needs one crop,
    so we take a random crop fixed by (seed, image bytes).
    """
    import torchvision
    from PIL import Image
    from torchvision import transforms

    image = Image.open(path).convert("RGB")
    width, height = image.size
    scale = max(resolution / width, resolution / height)
    shape = [round(height * scale), round(width * scale)]
    bilinear = transforms.InterpolationMode.BILINEAR
    image = torchvision.transforms.functional.resize(image, shape, interpolation=bilinear)
    if center_crop:
        image = transforms.CenterCrop((resolution, resolution))(image)
    else:
        g = torch.Generator().manual_seed(seed + int(_sha(Path(path).read_bytes())[:8], 16))
        top = int(torch.randint(0, shape[0] - resolution + 1, (1,), generator=g))
        left = int(torch.randint(0, shape[1] - resolution + 1, (1,), generator=g))
        image = transforms.functional.crop(image, top, left, resolution, resolution)
    tensor = transforms.ToTensor()(image)
    return transforms.Normalize([0.5], [0.5])(tensor)


def _save_atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _free(*objs: Any) -> None:
    """Drop references and give the memory back (CUDA cache too)."""
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class CacheReport:
    """What build_cache did."""

    root: Path
    samples: list[Sample]
    encoded_texts: int = 0
    encoded_images: int = 0
    validation_keys: dict[str, str] = field(default_factory=dict)
    negative_key: str = ""


def build_cache(cfg: Config, extra_prompts: Sequence[str] = (), plan: Plan | None = None) -> CacheReport:
    """Encode captions (ChatGLM) and images (fp16-fix VAE) missing from the cache, then free the encoders."""
    from kolors_lib.models import kolors_paths, resolve_model

    root = cfg.lora_dir / "cache"
    samples = read_metadata(cfg.train_dir)
    paths = kolors_paths(cfg)
    vae_file = resolve_model(cfg, "vae_fp16_fix") / "diffusion_pytorch_model.safetensors"
    plan = plan or device_plan(cfg)
    te, ve = plan.get("cache-captions", "text_encoder"), plan.get("cache-latents", "vae_encoder")
    te_id, vae_id = model_identity(paths.text_encoder), model_identity(vae_file)
    crop = "center" if cfg.train.center_crop else f"fixed-random-{cfg.seed}"
    for s in samples:
        img = cfg.train_dir / s.file_name
        if not img.is_file():
            raise TrainingError(f"{img} is listed in metadata.csv but missing")
        s.text_key = text_key(s.text, te_id, te.torch_dtype)
        s.image_key = image_key(img.read_bytes(), cfg.resolution, crop, cfg.train.random_flip, vae_id,
                                ve.torch_dtype)
    prompts = {p: text_key(p, te_id, te.torch_dtype) for p in [*extra_prompts, ""]}
    texts = {s.text_key: s.text for s in samples} | {k: p for p, k in prompts.items()}
    todo_text = {k: t for k, t in texts.items() if not (root / "text" / f"{k}.safetensors").is_file()}
    todo_img = {s.image_key: s for s in samples
                if not (root / "latents" / f"{s.image_key}.safetensors").is_file()}
    report = CacheReport(root, samples, len(todo_text), len(todo_img),
                         {p: k for p, k in prompts.items() if p}, prompts[""])
    # each encoder where the plan puts it (ChatGLM may stay on the CPU while the VAE uses the GPU)
    if todo_text:
        _encode(cfg, paths.text_encoder, None, todo_text, {}, te, plan.tiled_vae, root, crop, te_id, vae_id)
    if todo_img:
        _encode(cfg, None, vae_file, {}, todo_img, ve, plan.tiled_vae, root, crop, te_id, vae_id)
    index = [{"file_name": s.file_name, "text": s.text, "text_key": s.text_key, "image_key": s.image_key}
             for s in samples]
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


def _encode(cfg: Config, text_encoder: Path | None, vae_file: Path | None, texts: dict[str, str],
            images: dict[str, Sample], place: Placement, tiled: bool, root: Path, crop: str,
            te_id: str, vae_id: str) -> None:
    """Load only the encoders needed, run them once per item, write the cache, free them."""
    from diffsynth import SDXLImagePipeline

    from kolors_lib.models import load_model_manager

    files = [f for f in (text_encoder, vae_file) if f is not None]
    device, dtype = place.device, place.torch_dtype
    manager = load_model_manager(files, device="cpu" if place.dtype == "int8" else device, dtype=dtype)
    if place.dtype == "int8":
        to_int8(manager.fetch_model("kolors_text_encoder"), device)
    with contextlib.redirect_stdout(io.StringIO()):  # "Using ... / No ... available" per model kind
        pipe = SDXLImagePipeline.from_model_manager(manager)
    with torch.no_grad():
        for key, caption in texts.items():
            # the stock trainer's exact call: pipe.encode_prompt(text, positive=True)
            emb = pipe.encode_prompt([caption], positive=True)
            _save_atomic_safetensors({"encoder_hidden_states": emb["encoder_hidden_states"][0],
                                      "add_text_embeds": emb["add_text_embeds"][0]},
                                     root / "text" / f"{key}.safetensors",
                                     {"caption": caption, "encoder": te_id, "dtype": str(dtype)})
        for key, s in images.items():
            image = load_image_tensor(cfg.train_dir / s.file_name, cfg.resolution, cfg.train.center_crop,
                                      cfg.seed)
            batch = torch.stack([image, image.flip(-1)]) if cfg.train.random_flip else image[None]
            latents = pipe.vae_encoder(batch.to(dtype=dtype, device=device), tiled=tiled)
            tensors = {"latents": latents[0]}
            if cfg.train.random_flip:
                # the VAE is not exactly flip-equivariant: encode the mirrored image too
                tensors["latents_flipped"] = latents[1]
            _save_atomic_safetensors(tensors, root / "latents" / f"{key}.safetensors",
                                     {"file_name": s.file_name, "resolution": str(cfg.resolution),
                                      "crop": crop, "vae": vae_id, "dtype": str(dtype)})
    pipe.text_encoder_kolors = pipe.vae_encoder = pipe.prompter.text_encoder = None
    manager.model.clear()
    _free(manager, pipe)


def load_text(root: Path, key: str) -> dict[str, torch.Tensor]:
    """One cached caption encoding: encoder_hidden_states [256,D], add_text_embeds [D]."""
    from safetensors.torch import load_file

    return load_file(str(root / "text" / f"{key}.safetensors"))


def load_latents(root: Path, key: str) -> dict[str, torch.Tensor]:
    """One cached image: latents [4,h,w] (+ latents_flipped)."""
    from safetensors.torch import load_file

    return load_file(str(root / "latents" / f"{key}.safetensors"))


class CachedDataset(torch.utils.data.Dataset):
    """Training items read from the cache; item i of the run is fixed by (seed, i) so resuming is exact.

    Every pass over the data is a fresh permutation (no repeats within a pass), and with
    random_flip each item takes the mirrored latents with probability 1/2.
    """

    def __init__(self, report: CacheReport, start: int, length: int, seed: int, random_flip: bool):
        self.start, self.length, self.seed, self.random_flip = start, length, seed, random_flip
        self.latents = [load_latents(report.root, s.image_key) for s in report.samples]
        texts = {s.text_key: load_text(report.root, s.text_key) for s in report.samples}
        self.texts = [texts[s.text_key] for s in report.samples]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.latents)
        absolute = self.start + index
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + absolute // n))
        pick = int(perm[absolute % n])
        lat = self.latents[pick]
        flip = self.random_flip and bool(torch.rand(1, generator=torch.Generator().manual_seed(
            self.seed * 7_919 + absolute)) < 0.5)
        return {"latents": lat["latents_flipped"] if flip else lat["latents"], **self.texts[pick]}


# --------------------------------------------------------------------------- the module


def make_scheduler() -> Any:
    """Kolors' training scheduler exactly as the stock trainer sets it up."""
    patch_torchvision()
    from diffsynth.schedulers import EnhancedDDIMScheduler

    scheduler = EnhancedDDIMScheduler(beta_end=BETA_END, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    scheduler.set_timesteps(NUM_TRAIN_TIMESTEPS)
    return scheduler


def inject_lora(unet: torch.nn.Module, lora: LoraConfig, init: str = "gaussian") -> torch.nn.Module:
    """Freeze `unet` and add peft LoRA like the stock trainer (LoRA params upcast to fp32)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=init,
                            target_modules=list(lora.target_modules))
    unet = inject_adapter_in_model(config, unet)
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.to(torch.float32)
    return unet


def load_unet(cfg: Config, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """The Kolors UNet alone, through the one DiffSynth loading path."""
    from kolors_lib.models import kolors_paths, load_model_manager

    manager = load_model_manager([kolors_paths(cfg).unet], device=device, dtype=dtype)
    return manager.fetch_model("sdxl_unet")


def add_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """SDXL micro-conditioning as the pipeline builds it: (h, w, 0, 0, h, w) per sample, flattened."""
    height, width = latents.shape[2] * 8, latents.shape[3] * 8
    return torch.tensor([height, width, 0, 0, height, width], device=latents.device).repeat(latents.shape[0])


class KolorsLoraModule(L.LightningModule):
    """The Kolors UNet with LoRA, trained on cached latents and text embeddings."""

    def __init__(self, unet: torch.nn.Module, lora: LoraConfig, learning_rate: float = 1e-4,
                 gradient_checkpointing: bool = True, seed: int = 0, sample_offset: int = 0):
        super().__init__()
        self.unet = unet.train()  # DiffSynth loads in eval mode; checkpointing needs train mode
        self.lora = lora
        self.learning_rate = learning_rate
        self.gradient_checkpointing = gradient_checkpointing
        self.scheduler = make_scheduler()
        self.seed = seed
        self.sample_offset = sample_offset  # micro-batches done before this run (resume)
        self.step_losses: list[float] = []  # micro-batch losses of the current optimizer step
        self.resume_state: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Config, plan: Plan | None = None) -> KolorsLoraModule:
        """Load the UNet in the device plan's training dtype and add LoRA (gaussian init, as the Kolors example)."""
        unet = load_unet(cfg, (plan or device_plan(cfg)).get("train", "unet").torch_dtype)
        torch.manual_seed(cfg.seed)  # the gaussian LoRA init must not depend on what ran before
        return cls(inject_lora(unet, cfg.lora), cfg.lora, cfg.train.learning_rate,
                   cfg.train.gradient_checkpointing, cfg.seed)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable LoRA tensors in DiffSynth/peft naming (blocks.N....lora_A.default.weight)."""
        return {n: p.detach().to("cpu").clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy LoRA tensors in (missing or unexpected names are an error)."""
        params = dict(self.unet.named_parameters())
        if set(state) != {n for n, p in params.items() if p.requires_grad}:
            raise TrainingError("LoRA checkpoint does not match this UNet/LoRA shape")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Noise and timestep depend on the micro-batch number only, so a resumed run draws what
        # the uninterrupted one would have; ranks differ so DDP replicas see different noise.
        torch.manual_seed(self.seed * 1_000_003 + (self.sample_offset + batch_idx) * 97 + self.global_rank)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stock trainer's loss on a cached batch (same RNG calls in the same order)."""
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        latents = batch["latents"].to(dtype=dtype, device=self.device)
        noise = torch.randn_like(latents)
        timestep_id = torch.randint(0, self.scheduler.num_train_timesteps, (1,))
        timestep = self.scheduler.timesteps[timestep_id].to(self.device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timestep)
        target = self.scheduler.training_target(latents, noise, timestep)
        noise_pred = self.unet(
            noisy_latents, timestep=timestep,
            encoder_hidden_states=batch["encoder_hidden_states"].to(dtype=dtype, device=self.device),
            add_text_embeds=batch["add_text_embeds"].to(dtype=dtype, device=self.device),
            add_time_id=add_time_ids(latents), use_gradient_checkpointing=self.gradient_checkpointing)
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float())
        return loss * self.scheduler.training_weight(timestep)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch: loss, with a hard stop on NaN/inf before it can reach the weights."""
        loss = self.compute_loss(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            step = self.sample_offset // max(self._accum(), 1) + self.global_step + 1
            raise NonFiniteLossError(f"loss is {value} at step {step}; the weights were not updated. "
                                     "Lower the learning rate or check the data; the last good "
                                     "checkpoint is kept")
        self.step_losses.append(value)
        if self._trainer is not None:
            self.log("train_loss", loss, prog_bar=False, logger=False)
        return loss

    def _accum(self) -> int:
        return self.trainer.accumulate_grad_batches if self._trainer is not None else 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW (torch defaults, as the stock trainer) on the LoRA parameters only."""
        params = [p for p in self.unet.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate)

    def on_train_start(self) -> None:
        # Lightning keeps modules' modes; DiffSynth loads in eval, and the UNet's gradient
        # checkpointing only applies in train mode (the stock trainer calls .train() too)
        self.unet.train()
        if self.resume_state is None:
            return
        self.trainer.optimizers[0].load_state_dict(self.resume_state["optimizer"])
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and self.resume_state.get("scaler"):
            scaler.load_state_dict(self.resume_state["scaler"])


# --------------------------------------------------------------------------- checkpoints, results


def run_fingerprint(cfg: Config, report: CacheReport) -> str:
    """What must match for a checkpoint to be resumed (data, LoRA shape, optimisation settings)."""
    t = cfg.train
    parts = [str(cfg.lora.rank), str(cfg.lora.alpha), ",".join(cfg.lora.target_modules), str(t.learning_rate),
             str(t.batch_size), str(t.grad_accum), str(cfg.seed), str(cfg.resolution), str(t.random_flip),
             str(t.precision), *(s.image_key + s.text_key for s in report.samples)]
    return _sha(*parts)[:16]


def checkpoint_dir(cfg: Config) -> Path:
    """Where resumable checkpoints go."""
    return cfg.lora_dir / "checkpoints"


def list_checkpoints(cfg: Config) -> list[Path]:
    """Checkpoints on disk, oldest first."""
    return sorted(checkpoint_dir(cfg).glob("step-*.pt"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file then os.replace, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def lora_metadata(cfg: Config, step: int, base_model: str = "Kwai-Kolors/Kolors") -> dict[str, str]:
    """safetensors metadata (strings only) describing the LoRA and how it was trained."""
    t = cfg.train
    return {"format": "diffsynth-peft", "base_model": base_model, "profile": cfg.profile,
            "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha), "scale": str(cfg.lora.scale),
            "target_modules": ",".join(cfg.lora.target_modules), "init_lora_weights": "gaussian",
            "trigger_word": cfg.filter.trigger_word or "", "steps": str(step),
            "learning_rate": str(t.learning_rate), "batch_size": str(t.batch_size),
            "grad_accum": str(t.grad_accum), "precision": str(t.precision), "resolution": str(cfg.resolution),
            "seed": str(cfg.seed), "center_crop": str(t.center_crop), "random_flip": str(t.random_flip),
            "scheduler": f"EnhancedDDIM(num_train_timesteps={NUM_TRAIN_TIMESTEPS}, beta_end={BETA_END})"}


def read_loss_csv(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of loss.csv."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@dataclass
class TrainResult:
    """Where a training run left its outputs."""

    lora_path: Path
    loss_csv: Path
    checkpoints: list[Path]
    steps: int
    resumed_from: int
    seconds: float
    cache: Path
    validation_images: list[Path] = field(default_factory=list)

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) per optimizer step."""
        return read_loss_csv(self.loss_csv)

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second of this call (resumed steps excluded)."""
        return (self.steps - self.resumed_from) / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        new = self.steps - self.resumed_from
        if new == 0:
            run = f"all {self.steps} steps were done before (nothing to train)"
        elif self.resumed_from:
            run = f"resumed at step {self.resumed_from}, trained {new} more ({self.steps_per_second:.2f} steps/s)"
        else:
            run = f"trained {new} steps ({self.steps_per_second:.2f} steps/s)"
        return f"{run}; LoRA: {self.lora_path}"

    def loss_plot(self, smooth: int = 10) -> Any:
        """matplotlib Figure of the loss per step and its moving average (no display needed)."""
        from matplotlib.figure import Figure

        rows = self.losses
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot()
        if rows:
            steps, losses = zip(*rows, strict=True)
            ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
            k = max(1, min(smooth, len(losses)))
            avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                   for i in range(len(losses))]
            ax.plot(steps, avg, lw=1.5, label=f"mean of {k}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("MSE loss")
        ax.set_title("Kolors LoRA training loss")
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------- callbacks


class _RunCallback(L.Callback):
    """Per optimizer step: loss.csv row, tqdm bar, checkpoints every `save_every`, validation grids."""

    def __init__(self, cfg: Config, total: int, start: int, fingerprint: str,
                 validator: _Validator | None = None):
        self.cfg, self.total, self.start, self.fingerprint = cfg, total, start, fingerprint
        self.validator = validator
        self.loss_csv = cfg.lora_dir / "loss.csv"
        self.bar: Any = None
        self.last_step = start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc="LoRA steps", unit="step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = self.start + trainer.global_step
        if step == self.last_step:
            return  # mid-accumulation
        self.last_step = step
        assert isinstance(pl_module, KolorsLoraModule)
        losses, pl_module.step_losses = pl_module.step_losses, []
        loss = sum(losses) / max(len(losses), 1)
        if not trainer.is_global_zero:
            return
        with open(self.loss_csv, "a", newline="") as f:
            f.write(f"{step},{loss:.8g}\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        save_every = self.cfg.train.save_every
        if save_every and (step % save_every == 0 or step == self.total):
            self._checkpoint(trainer, pl_module, step)
        every = self.cfg.train.validate_every
        if self.validator is not None and every and step % every == 0:
            self.validator.render(pl_module.unet, step)

    def _checkpoint(self, trainer: L.Trainer, module: KolorsLoraModule, step: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        state = {"step": step, "total": self.total, "fingerprint": self.fingerprint,
                 "lora": module.lora_state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None}
        save_checkpoint(checkpoint_dir(self.cfg) / f"step-{step:07d}.pt", state)
        for old in list_checkpoints(self.cfg)[:-CKPT_KEEP]:
            old.unlink(missing_ok=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Validator:
    """Renders the validation prompts with the training UNet from cached embeddings into a grid."""

    def __init__(self, cfg: Config, report: CacheReport, plan: Plan, steps: int = 10, cfg_scale: float = 5.0):
        from kolors_lib.models import load_model_manager, resolve_model

        vae = resolve_model(cfg, "vae_fp16_fix") / "diffusion_pytorch_model.safetensors"
        place = plan.get("validate", "vae_decoder")
        self.device, self.tiled = place.device, plan.tiled_vae
        self.decoder = load_model_manager([vae], device=self.device, dtype=place.torch_dtype).fetch_model(
            "sdxl_vae_decoder")
        self.prompts = list(cfg.train.validation_prompts)
        self.texts = [load_text(report.root, report.validation_keys[p]) for p in self.prompts]
        self.negative = load_text(report.root, report.negative_key)
        self.cfg, self.steps, self.cfg_scale = cfg, steps, cfg_scale
        self.out_dir = cfg.lora_dir / "validation"
        self.images: list[Path] = []

    @torch.no_grad()
    def render(self, unet: torch.nn.Module, step: int) -> Path:
        """One image per prompt (fixed seed), pasted side by side into validation/step-N.png."""
        from PIL import Image

        was_training = unet.training
        unet.eval()
        scheduler = make_scheduler()
        scheduler.set_timesteps(self.steps)
        dtype = next(unet.parameters()).dtype
        device = next(unet.parameters()).device
        size = self.cfg.resolution // 8
        tiles = []
        for i, text in enumerate(self.texts):
            g = torch.Generator().manual_seed(self.cfg.seed + i)
            latents = torch.randn((1, 4, size, size), generator=g).to(device=device, dtype=dtype)
            for t in scheduler.timesteps:
                timestep = t.unsqueeze(0).to(device)
                preds = [unet(latents, timestep=timestep,
                              encoder_hidden_states=e["encoder_hidden_states"][None].to(device, dtype),
                              add_text_embeds=e["add_text_embeds"][None].to(device, dtype),
                              add_time_id=add_time_ids(latents)) for e in (text, self.negative)]
                pred = preds[1] + self.cfg_scale * (preds[0] - preds[1])
                latents = scheduler.step(pred, timestep, latents)
            pixels = self.decoder(latents.to(self.device, torch.float32), tiled=self.tiled)[0].float().cpu()
            array = ((pixels.permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
            tiles.append(Image.fromarray(array))
        unet.train(was_training)
        grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
        x = 0
        for tile in tiles:
            grid.paste(tile, (x, 0))
            x += tile.width
        path = self.out_dir / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.images.append(path)
        return path


# --------------------------------------------------------------------------- train_lora


_OVERRIDE_KEYS = {"rank": ("lora", "rank"), "alpha": ("lora", "alpha"), "lr": ("train", "learning_rate"),
                  "learning_rate": ("train", "learning_rate"), "resolution": (None, "resolution"),
                  "seed": (None, "seed"), "device": (None, "device")}


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Copy of cfg with overrides: train.* names (steps, batch_size...), rank, alpha, lr, resolution, seed."""
    import copy

    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = _OVERRIDE_KEYS.get(key, ("train", key))
        target = cfg if section is None else getattr(cfg, section)
        if not hasattr(target, name):
            raise TrainingError(f"unknown training override {key!r}")
        setattr(target, name, value)
    return cfg


def total_steps(cfg: Config, n_images: int, world: int = 1) -> int:
    """Optimizer steps of the run: train.steps, or train.epochs passes over the data when set."""
    if cfg.train.epochs:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * world
        return max(1, math.ceil(cfg.train.epochs * n_images / per_step))
    return int(cfg.train.steps)


def _resume_state(cfg: Config, fingerprint: str, resume: bool) -> dict[str, Any] | None:
    """The newest checkpoint of this same run, or None (stale checkpoints are removed)."""
    ckpts = list_checkpoints(cfg)
    if not ckpts:
        return None
    if resume:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            return state
        warnings.warn(f"{ckpts[-1].name} belongs to a run with other data or settings: starting afresh",
                      stacklevel=3)
    for path in ckpts:
        path.unlink()
    return None


def _truncate_loss_csv(path: Path, upto: int) -> None:
    rows = [r for r in read_loss_csv(path) if r[0] <= upto]
    with open(path, "w", newline="") as f:
        f.write("step,loss\n")
        f.writelines(f"{s},{v:.8g}\n" for s, v in rows)


def save_lora(module: KolorsLoraModule, path: Path, metadata: dict[str, str]) -> Path:
    """Write the LoRA (DiffSynth/peft key names, fp32) as safetensors, atomically."""
    _save_atomic_safetensors(module.lora_state_dict(), path, metadata)
    return path


def _world_size(devices: Any, accelerator: str) -> int:
    if isinstance(devices, int):
        return devices
    if isinstance(devices, list | tuple):
        return len(devices)
    return 1 if accelerator in ("cpu", "auto") or not torch.cuda.is_available() else torch.cuda.device_count()


def train_lora(cfg: Config, *, resume: bool = True, callbacks: Iterable[L.Callback] = (),
               **overrides: Any) -> TrainResult:
    """Cache encodings, train the LoRA with Lightning, checkpoint/resume, write kolors_lora.safetensors."""
    cfg = apply_overrides(cfg, overrides)
    t = cfg.train
    begin = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    plan = device_plan(cfg)
    report = build_cache(cfg, t.validation_prompts if t.validate_every else (), plan)
    fingerprint = run_fingerprint(cfg, report)
    world = _world_size(t.devices, t.accelerator)
    total = total_steps(cfg, len(report.samples), world)
    state = _resume_state(cfg, fingerprint, resume)
    start = int(state["step"]) if state else 0
    cfg.lora_dir.mkdir(parents=True, exist_ok=True)
    loss_csv = cfg.lora_dir / "loss.csv"
    _truncate_loss_csv(loss_csv, start)
    module = KolorsLoraModule.from_config(cfg, plan)
    module.sample_offset = start * t.grad_accum
    if state:
        module.load_lora_state_dict(state["lora"])
        module.resume_state = state
    if start < total:
        _fit(cfg, plan, module, report, start, total, world, fingerprint, list(callbacks))
    final = save_lora(module, cfg.lora_dir / FINAL_NAME, lora_metadata(cfg, total))
    validator_images = sorted((cfg.lora_dir / "validation").glob("step-*.png"))
    return TrainResult(final, loss_csv, list_checkpoints(cfg), total, start, time.perf_counter() - begin,
                       report.root, validator_images)


def _strategy(name: str) -> str:
    """Plain "ddp" re-launches the running script, impossible from a notebook: fork there instead."""
    import __main__

    return "ddp_notebook" if name == "ddp" and not hasattr(__main__, "__file__") else name


def _fit(cfg: Config, plan: Plan, module: KolorsLoraModule, report: CacheReport, start: int, total: int, world: int,
         fingerprint: str, callbacks: list[L.Callback]) -> None:
    t = cfg.train
    remaining = total - start
    dataset = CachedDataset(report, start * t.batch_size * t.grad_accum * world,
                            remaining * t.batch_size * t.grad_accum * world, cfg.seed, t.random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, shuffle=False,
                                         num_workers=t.num_workers, persistent_workers=t.num_workers > 0)
    validator = _Validator(cfg, report, plan) if t.validate_every and t.validation_prompts else None
    run = _RunCallback(cfg, total, start, fingerprint, validator)
    trainer = L.Trainer(accelerator=t.accelerator, devices=t.devices, strategy=_strategy(t.strategy),
                        precision=plan.precision,
                        max_steps=remaining, max_epochs=-1, accumulate_grad_batches=t.grad_accum,
                        callbacks=[run, *callbacks], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(cfg.lora_dir))
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        run.close()


# --------------------------------------------------------------------------- estimate


# Real Kwai-Kolors sizes (parameters), measured with diffsynth 1.1.9
REAL_PARAMS = {"unet": 2_579_000_000, "text_encoder": 6_244_000_000, "vae_encoder": 34_000_000,
               "vae_decoder": 49_000_000}


def lora_param_count(rank: int, target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out")) -> int:
    """LoRA parameters on the real Kolors UNet: rank*(in+out) per targeted Linear (meta device, no memory)."""
    patch_torchvision()
    from diffsynth.models.sdxl_unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in target_modules)


def estimate(cfg: Config) -> dict[str, float]:
    """Rough GPU memory (GiB) and relative time for cfg's training, from parameter counts.

    Memory: frozen UNet weights in the training dtype, LoRA weights + grads + AdamW moments in
    fp32, and activations scaled from the published ~22 GB at 1024², batch 1, 16-mixed with
    gradient checkpointing (about 15 GiB of it activations; ~3x more without checkpointing).
    ChatGLM and the VAE encoder are not resident during steps thanks to the cache.
    """
    gib = 1024 ** 3
    bytes_w = 4 if "32" in str(cfg.train.precision) else 2
    lora = lora_param_count(cfg.lora.rank, cfg.lora.target_modules)
    weights = REAL_PARAMS["unet"] * bytes_w / gib
    lora_mem = lora * 16 / gib  # fp32 weight + grad + 2 AdamW moments
    pixels = (cfg.resolution / 1024) ** 2 * cfg.train.batch_size
    act = 15.0 * pixels * (1 if cfg.train.gradient_checkpointing else 3) * (2 if bytes_w == 4 else 1)
    cache_text = REAL_PARAMS["text_encoder"] * bytes_w / gib
    return {"lora_params": float(lora), "unet_weights_gib": round(weights, 2),
            "lora_train_state_gib": round(lora_mem, 3),
            "activations_gib": round(act, 2), "train_total_gib": round(weights + lora_mem + act + 1.0, 1),
            "cache_phase_gib": round(cache_text + REAL_PARAMS["vae_encoder"] * bytes_w / gib + 1.0, 1),
            "stock_trainer_total_gib": round(weights + lora_mem + act + cache_text + 1.2, 1),
            "relative_step_time": round(pixels * (1.3 if cfg.train.gradient_checkpointing else 1.0), 3)}


# --------------------------------------------------------------------------- CLI


def main_train(argv: list[str]) -> int:
    """CLI entry: train, print where the LoRA went; 2 with a message on a training error."""
    from kolors_lib.args import build_train_parser

    return run_train(build_train_parser().parse_args(argv))


def run_train(args: argparse.Namespace) -> int:
    """Run step 03 from parsed arguments."""
    from kolors_lib.config import ConfigError, load_config
    from kolors_lib.models import ModelUnavailableError

    try:
        cfg = load_config(args.config, profile=args.profile, workdir=args.workdir)
        result = train_lora(cfg, resume=not args.no_resume, steps=args.steps, rank=args.rank,
                            alpha=args.alpha, lr=args.lr, batch_size=args.batch_size,
                            grad_accum=args.grad_accum, precision=args.precision,
                            resolution=args.resolution, seed=args.seed, save_every=args.save_every)
    except (ConfigError, TrainingError, ModelUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    last = result.losses[-1][1] if result.losses else float("nan")
    print(f"trained {result.steps} steps (resumed from {result.resumed_from}) in {result.seconds:.1f} s, "
          f"final loss {last:.4f}\nLoRA: {result.lora_path}\nloss log: {result.loss_csv}")
    return 0
