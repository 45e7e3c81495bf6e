"""Step 03's encode-once cache: every caption through ChatGLM and every image through the VAE, once.

`build_cache` encodes what is missing (keys: content + encoder identity + dtype + crop), then frees the
encoders; `CachedDataset` serves training items from the cache alone, fixed by (seed, index) so a
resumed run sees exactly the items an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kolors_lib.core.config import Config
from kolors_lib.core.device_plan import Placement, Plan, device_plan
from kolors_lib.core.errors import MissingInputError, TrainingError
from kolors_lib.core.files import save_safetensors, write_text
from kolors_lib.kolors.quantize import to_int8
from kolors_lib.train.buckets import batch_plan, bucket_sizes, nearest_bucket

CACHE_VERSION = "1"


# --------------------------------------------------------------------------- fingerprints


def content_hash(*parts: str | bytes) -> str:
    """SHA-256 (hex) of the parts, each followed by a NUL so that part boundaries count."""
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
    return content_hash(str(size), head, tail)


def model_identity(path: str | Path) -> str:
    """Identity of a model file or folder (names, sizes and content prints of its files)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    return content_hash(*(f"{p.relative_to(root)}:{_file_print(p)}" for p in files))[:16]


def text_key(caption: str, encoder_id: str, dtype: torch.dtype) -> str:
    """Cache key of one caption's encoding."""
    return content_hash("text", CACHE_VERSION, caption, encoder_id, str(dtype))[:32]


def image_key(data: bytes, resolution: int, crop: str, flip: bool, vae_id: str, dtype: torch.dtype) -> str:
    """Cache key of one image's latents (bytes, resolution, crop mode, flip copy, VAE, dtype)."""
    return content_hash("image", CACHE_VERSION, data, str(resolution), crop, str(flip), vae_id, str(dtype))[:32]


# --------------------------------------------------------------------------- settings


@dataclass
class Sample:
    """One training image: its caption and cache keys."""

    file_name: str
    text: str
    image_key: str = ""
    text_key: str = ""
    size: tuple[int, int] | None = None  # (width, height) it is cached at: the square, or its bucket


def read_samples(train_dir: Path) -> list[Sample]:
    """Rows of DiffSynth's train/metadata.csv (file_name,text)."""
    from kolors_lib.core.inputs import train_metadata

    meta = train_metadata(train_dir)
    with open(meta, newline="", encoding="utf-8") as f:
        rows = [Sample(r["file_name"], r.get("text") or "") for r in csv.DictReader(f)]
    if not rows:
        raise TrainingError(f"{meta} lists no images")
    return rows


# --------------------------------------------------------------------------- caching


def load_image_tensor(path: Path, resolution: int, center_crop: bool, seed: int,
                      size: tuple[int, int] | None = None, augment: Callable[[Any], Any] | None = None
                      ) -> torch.Tensor:
    """Image -> [3,R,R] in [-1,1], resized and cropped exactly like DiffSynth's TextImageDataset.

    Without center_crop the stock dataset crops at random each step; a cache needs one crop,
    so we take a random crop fixed by (seed, image bytes). `size` (width, height) replaces the
    square (aspect-ratio buckets); `augment` maps the PIL image first (a cached variant).
    """
    import torchvision
    from PIL import Image
    from torchvision import transforms

    image = Image.open(path).convert("RGB")
    if augment is not None:
        image = augment(image)
    out_w, out_h = size or (resolution, resolution)
    width, height = image.size
    scale = max(out_w / width, out_h / height)
    shape = [round(height * scale), round(width * scale)]
    bilinear = transforms.InterpolationMode.BILINEAR
    image = torchvision.transforms.functional.resize(image, shape, interpolation=bilinear)
    if center_crop:
        image = transforms.CenterCrop((out_h, out_w))(image)
    else:
        g = torch.Generator().manual_seed(seed + int(content_hash(Path(path).read_bytes())[:8], 16))
        top = int(torch.randint(0, shape[0] - out_h + 1, (1,), generator=g))
        left = int(torch.randint(0, shape[1] - out_w + 1, (1,), generator=g))
        image = transforms.functional.crop(image, top, left, out_h, out_w)
    tensor = transforms.ToTensor()(image)
    return transforms.Normalize([0.5], [0.5])(tensor)


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


def build_cache(cfg: Config, extra_prompts: Sequence[str] = (), negative: str = "",
                plan: Plan | None = None) -> CacheReport:
    """Encode captions (ChatGLM) and images (fp16-fix VAE) missing from the cache, then free the encoders.

    `extra_prompts` and `negative` (validation images) are encoded too; `negative` becomes negative_key.
    Each encoder runs where the device plan (`plan`, default cfg's) puts it, in its dtype.
    """
    from kolors_lib.kolors.models import kolors_paths, resolve_model

    root = cfg.lora_dir / "cache"
    samples = read_samples(cfg.train_dir)
    paths = kolors_paths(cfg)
    vae_file = resolve_model(cfg, "vae_fp16_fix") / "diffusion_pytorch_model.safetensors"
    plan = plan or device_plan(cfg)
    te, ve = plan.get("cache-captions", "text_encoder"), plan.get("cache-latents", "vae_encoder")
    te_id, vae_id = model_identity(paths.text_encoder), model_identity(vae_file)
    crop = "center" if cfg.train.center_crop else f"fixed-random-{cfg.seed}"
    t = cfg.train
    if t.augment_variants:
        crop += f";variants={t.augment_variants},{t.augment_crop_scale},{t.augment_jitter}"
    for s in samples:
        img = cfg.train_dir / s.file_name
        if not img.is_file():
            raise TrainingError(f"{img} is listed in metadata.csv but missing")
        s.text_key = text_key(s.text, te_id, te.torch_dtype)
        s.size = _cache_size(cfg, img)
        shape = f";bucket={s.size[0]}x{s.size[1]}" if t.buckets else ""  # the stock square keeps its keys
        s.image_key = image_key(img.read_bytes(), cfg.resolution, crop + shape, t.random_flip, vae_id,
                                ve.torch_dtype)
    prompts = {p: text_key(p, te_id, te.torch_dtype) for p in [*extra_prompts, negative]}
    texts = {s.text_key: s.text for s in samples} | {k: p for p, k in prompts.items()}
    todo_text = {k: t for k, t in texts.items() if not (root / "text" / f"{k}.safetensors").is_file()}
    todo_img = {s.image_key: s for s in samples
                if not (root / "latents" / f"{s.image_key}.safetensors").is_file()}
    report = CacheReport(root, samples, len(todo_text), len(todo_img),
                         {p: k for p, k in prompts.items() if p}, prompts[negative])
    # each encoder where the plan puts it (ChatGLM may stay on the CPU while the VAE uses the GPU)
    if todo_text:
        _encode(cfg, paths.text_encoder, None, todo_text, {}, te, plan.tiled_vae, root, crop, te_id, vae_id)
    if todo_img:
        _encode(cfg, None, vae_file, {}, todo_img, ve, plan.tiled_vae, root, crop, te_id, vae_id)
    index = [{"file_name": s.file_name, "text": s.text, "text_key": s.text_key, "image_key": s.image_key,
              "size": list(s.size or ())} for s in samples]
    write_text(root / "index.json", json.dumps(index, ensure_ascii=False, indent=1))
    return report


TEXT_TOKENS = 256  # DiffSynth's Kolors prompter pads/truncates every prompt to 256 ChatGLM tokens


def _warn_if_truncated(tokenizer: Any, caption: str) -> None:
    """Warn when ChatGLM will only see the first 256 tokens of `caption` (the rest is silently dropped)."""
    n = len(tokenizer(caption)["input_ids"])
    if n > TEXT_TOKENS:
        warnings.warn(f"caption of {n} tokens is cut to the first {TEXT_TOKENS} (ChatGLM's limit in Kolors): "
                      f"{caption[:60]!r}...; shorten it so every word counts", stacklevel=3)


def _encode(cfg: Config, text_encoder: Path | None, vae_file: Path | None, texts: dict[str, str],
            images: dict[str, Sample], place: Placement, tiled: bool, root: Path, crop: str,
            te_id: str, vae_id: str) -> None:
    """Load only the encoders needed, run them once per item, write the cache, free them."""
    from diffsynth import SDXLImagePipeline

    from kolors_lib.kolors.models import load_model_manager

    files = [f for f in (text_encoder, vae_file) if f is not None]
    device, dtype = place.device, place.torch_dtype
    manager = load_model_manager(files, device="cpu" if place.dtype == "int8" else device, dtype=dtype)
    if place.dtype == "int8":
        to_int8(manager.fetch_model("kolors_text_encoder"), device)
    with contextlib.redirect_stdout(io.StringIO()):  # "Using ... / No ... available" per model kind
        pipe = SDXLImagePipeline.from_model_manager(manager)
    with torch.no_grad():
        for key, caption in texts.items():
            _warn_if_truncated(pipe.prompter.tokenizer, caption)
            # the stock trainer's exact call: pipe.encode_prompt(text, positive=True)
            emb = pipe.encode_prompt([caption], positive=True)
            save_safetensors({"encoder_hidden_states": emb["encoder_hidden_states"][0],
                                      "add_text_embeds": emb["add_text_embeds"][0]},
                                     root / "text" / f"{key}.safetensors",
                                     {"caption": caption, "encoder": te_id, "dtype": str(dtype)})
        for key, s in images.items():
            tensors = {}
            content = content_hash((cfg.train_dir / s.file_name).read_bytes()) if cfg.train.augment_variants else ""
            for variant in range(cfg.train.augment_variants + 1):
                augment = _augment(cfg, content, variant)
                image = load_image_tensor(cfg.train_dir / s.file_name, cfg.resolution, cfg.train.center_crop,
                                          cfg.seed, s.size, augment)
                batch = torch.stack([image, image.flip(-1)]) if cfg.train.random_flip else image[None]
                latents = pipe.vae_encoder(batch.to(dtype=dtype, device=device), tiled=tiled)
                name = f"variant_{variant}" if variant else "latents"
                tensors[name] = latents[0]
                if cfg.train.random_flip:
                    # the VAE is not exactly flip-equivariant: encode the mirrored image too
                    tensors[f"{name}_flipped"] = latents[1]
            save_safetensors(tensors, root / "latents" / f"{key}.safetensors",
                                     {"file_name": s.file_name, "resolution": str(cfg.resolution),
                                      "crop": crop, "vae": vae_id, "dtype": str(dtype)})
    pipe.text_encoder_kolors = pipe.vae_encoder = pipe.prompter.text_encoder = None
    manager.model.clear()
    _free(manager, pipe)


def _cache_size(cfg: Config, path: Path) -> tuple[int, int]:
    """(width, height) an image is cached at: resolution² or, with train.buckets, its nearest bucket."""
    if not cfg.train.buckets:
        return (cfg.resolution, cfg.resolution)
    from PIL import Image


    with Image.open(path) as image:
        return nearest_bucket(*image.size, bucket_sizes(cfg.resolution, cfg.train.bucket_max_aspect))


def _augment(cfg: Config, content: str, variant: int) -> Callable[[Any], Any] | None:
    """The augmentation of cached variant `variant` of an image whose bytes hash to `content` (None: the original)."""
    if not variant:
        return None
    from kolors_lib.train.augment import Augment, variant_seed

    seed = variant_seed(cfg.seed, content, variant)
    return Augment(seed, cfg.train.augment_crop_scale, cfg.train.augment_jitter)


def pick_latents(entry: dict[str, torch.Tensor], seed: int, absolute: int, random_flip: bool) -> torch.Tensor:
    """The latents item `absolute` of the run trains on: a cached variant (if any) at random, mirrored with p=1/2."""
    variants = sum(1 for k in entry if k.startswith("variant_") and not k.endswith("_flipped"))
    name = "latents"
    if variants:
        pick = int(torch.randint(0, variants + 1, (1,), generator=torch.Generator().manual_seed(
            seed * 7_927 + absolute)))
        name = f"variant_{pick}" if pick else "latents"
    flip = random_flip and bool(torch.rand(1, generator=torch.Generator().manual_seed(
        seed * 7_919 + absolute)) < 0.5)
    if not flip:
        return entry[name]
    return entry[f"{name}_flipped"]


def load_text(root: Path, key: str) -> dict[str, torch.Tensor]:
    """One cached caption encoding: encoder_hidden_states [256,D], add_text_embeds [D]."""
    from safetensors.torch import load_file

    return load_file(str(root / "text" / f"{key}.safetensors"))


def load_latents(root: Path, key: str) -> dict[str, torch.Tensor]:
    """One cached image: latents [4,h,w] (+ latents_flipped)."""
    from safetensors.torch import load_file

    return load_file(str(root / "latents" / f"{key}.safetensors"))


def cached_batch(root: Path, index: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """Training image `index` of the cache in `root` (lora/cache) as a batch of one: its file name and the batch."""
    listing = root / "index.json"
    if not listing.is_file():
        raise MissingInputError(f"{listing} not found: train a LoRA first (step 03), it fills the cache")
    entries = json.loads(listing.read_text(encoding="utf-8"))
    entry = entries[index]
    batch = {"latents": load_latents(root, entry["image_key"])["latents"], **load_text(root, entry["text_key"])}
    return entry["file_name"], {k: v[None] for k, v in batch.items()}


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
        return {"latents": pick_latents(self.latents[pick], self.seed, absolute, self.random_flip),
                **self.texts[pick]}


class BucketBatches(CachedDataset):
    """Whole training batches (one bucket each) read from the cache; batch i of the run is fixed by (seed, i).

    Use with DataLoader(batch_size=None); under DDP each rank gets whole batches.
    """

    def __init__(self, report: CacheReport, start: int, length: int, seed: int, batch_size: int,
                 random_flip: bool):
        super().__init__(report, start, length, seed, random_flip)
        self.buckets = [tuple(lat["latents"].shape[-2:]) for lat in self.latents]
        self.batch_size = batch_size
        self.per_epoch = len(batch_plan(self.buckets, batch_size, seed, 0))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        absolute = self.start + index
        plan = batch_plan(self.buckets, self.batch_size, self.seed, absolute // self.per_epoch)
        picks = plan[absolute % self.per_epoch]
        items = [{"latents": pick_latents(self.latents[p], self.seed, absolute * self.batch_size + k,
                                          self.random_flip), **self.texts[p]} for k, p in enumerate(picks)]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
