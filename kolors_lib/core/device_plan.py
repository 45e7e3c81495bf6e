"""One device plan: for every phase, which model sits on which device in which dtype, and its memory.

`device_plan(cfg, hardware)` is the only place that picks a device or dtype for a model;
training, the storyboard renderer and the scorer read their placement from it. It imports
no torch (the `plan` command answers at once); `Hardware.detect()` asks torch.

Estimates (GiB = 2**30 bytes) are weights from parameter counts plus activation peaks
measured on the real-size architecture (see ACTIVATIONS_1024 and docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from kolors_lib.core.config import Config

GIB = 2**30

# Parameters of the real models (diffsynth 1.1.9 classes, counted on the meta device; tests
# recount them): Kolors UNet, ChatGLM3-6B, the SDXL VAE halves, the aesthetic predictor
# (CLIP ViT-L/14 vision tower + projection + MLP head).
PARAMS = {"unet": 2_579_458_820, "text_encoder": 6_243_584_000, "vae_encoder": 34_163_664,
          "vae_decoder": 49_490_199, "aesthetic": 304_894_177}
# The tiny profile's random models (kolors_lib.offline_models.tiny; tests recount them)
TINY_PARAMS = {"unet": 14_210_564, "text_encoder": 8_397_376, "vae_encoder": 580_688, "vae_decoder": 819_191,
               "aesthetic": 199_265}
# ChatGLM's word embedding and output layer stay 16-bit under bitsandbytes int8 (2 x 65024 x 4096)
CHATGLM_NON_LINEAR = 532_676_608
PADDED_VOCAB = 65024
# LoRA parameters per unit of rank on Kolors' to_q/to_k/to_v/to_out (architecture.lora_param_count(1))
LORA_PARAMS_PER_RANK = 1_451_520

# Training activations at 1024² with gradient checkpointing: measured 3.79 GiB over the weights for
# one step at 1024² (bf16, rank 16, incl. AdamW; `make bench`, case cpu-1024), minus 0.26 GiB of LoRA
# grads + moments.
TRAIN_1024 = 3.55
# DiffSynth's tiled VAE works on 64-latent tiles one at a time: a quarter of the untiled 1024² peak
VAE_TILED = 0.9
# Activation peaks (GiB) at 1024², batch 1, over the weights, measured on CPU with the real-size
# random-weight models, one process per case, peak RSS minus RSS after building the model
# (docs/benchmarks.md, "Activation figures"). torch's CPU attention is a flash kernel (no score
# matrices), like CUDA's; the CUDA reserve below covers cuDNN workspaces. They scale with the
# pixel count (resolution² x batch).
ACTIVATIONS_1024 = {
    "train": TRAIN_1024,   # UNet fwd+bwd, gradient checkpointing, bf16 (see TRAIN_1024)
    "train_no_ckpt": 3 * TRAIN_1024,  # without checkpointing: not measured, DiffSynth's rule of thumb (x3)
    "denoise": 0.7,        # one UNet forward under no_grad, bf16: measured 0.66 (bench case cpu-1024)
    "vae_decode": 3.6,     # SDXL VAE decoder, fp32 (DiffSynth upcasts SDXL VAEs): measured 3.52
    "vae_decode_tiled": VAE_TILED,  # same, DiffSynth's tiles (64 latents, stride 32)
    "vae_encode": 3.6,     # SDXL VAE encoder, fp32: not measured, taken as the decoder's
    "vae_encode_tiled": VAE_TILED,
    "text": 0.1,           # ChatGLM3-6B, one 256-token prompt: 28 hidden states of 256 x 4096 (computed)
    "score": 0.2,          # CLIP ViT-L/14 at 224², batch 8 (computed: 8 x 257 tokens x 1024 x 24 layers)
}
# CUDA context, cuDNN workspaces and allocator slack that max_memory_allocated does not show
CUDA_RESERVE_GIB = 0.75
# ChatGLM3-6B on one 256-token prompt: 2 x params x tokens FLOPs (DiffSynth pads to 256)
TEXT_FLOPS_PER_PROMPT = 2 * PARAMS["text_encoder"] * 256
# bf16 GEMM throughput of ChatGLM on a CPU: measured ~165 GFLOP/s (~20 s/prompt) on 2 cores with
# AVX-512 bf16 in the full-size rehearsal (docs/benchmarks.md); CPUs without it are several times slower
CPU_GFLOPS = 165.0

# caching runs ChatGLM over the captions, frees it, then the VAE encoder over the images
PHASES = ("cache-captions", "cache-latents", "train", "validate", "storyboard-encode", "storyboard-denoise", "score")


@dataclass(frozen=True)
class Hardware:
    """What the plan is made for: a CUDA GPU (its memory, bf16 support) or none, and host RAM."""

    cuda: bool
    gpu_gib: float = 0.0
    bf16: bool = False
    ram_gib: float = 0.0
    int8: bool = False  # bitsandbytes installed (8-bit ChatGLM on the GPU)
    name: str = "CPU"

    @classmethod
    def detect(cls) -> Hardware:
        """This machine, as torch sees it."""
        import torch

        ram = host_ram_gib()
        if not torch.cuda.is_available():
            return cls(False, ram_gib=ram)
        props = torch.cuda.get_device_properties(0)
        return cls(True, round(props.total_memory / GIB, 1), bool(torch.cuda.is_bf16_supported()), ram,
                   importlib.util.find_spec("bitsandbytes") is not None, props.name)

    @classmethod
    def card(cls, gpu_gib: float, bf16: bool = True, ram_gib: float | None = None,
             int8: bool | None = None) -> Hardware:
        """A described (not detected) CUDA card: plan for a machine you do not have."""
        bnb = importlib.util.find_spec("bitsandbytes") is not None if int8 is None else int8
        return cls(True, float(gpu_gib), bf16, host_ram_gib() if ram_gib is None else ram_gib, bnb,
                   f"GPU {gpu_gib:g} GiB{'' if bf16 else ', no bf16'}")


# the cards learners have (README "Which cards fit"); T4: 15 GiB usable, no bf16
CARDS = {"A10 (24 GB, ModelScope)": Hardware(True, 24.0, True, 30.0, False, "A10"),
         "T4 (16 GB, Colab/Kaggle)": Hardware(True, 15.0, False, 12.0, False, "T4"),
         "12 GB card": Hardware(True, 12.0, True, 16.0, False, "12 GB"),
         "8 GB card": Hardware(True, 8.0, True, 16.0, False, "8 GB")}


def host_ram_gib() -> float:
    """Physical memory of this machine (0 where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


@dataclass(frozen=True)
class Placement:
    """One model in one phase: device, dtype and the memory it takes there."""

    phase: str
    model: str
    device: str
    dtype: str  # float32, float16, bfloat16 or int8
    gib: float  # weights + activation peak on `device`
    note: str = ""

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype to load the weights in (int8: fp16, then bitsandbytes quantises)."""
        import torch

        return torch.float16 if self.dtype == "int8" else getattr(torch, self.dtype)


@dataclass
class Plan:
    """Every phase's placements, the Lightning precision, VAE tiling and the GPU peak per phase."""

    profile: str
    hardware: Hardware
    resolution: int
    precision: str
    tiled_vae: bool
    placements: list[Placement] = field(default_factory=list)
    train_resolution: int | None = None  # the largest training side that fits the card (None: no CUDA)

    def get(self, phase: str, model: str) -> Placement:
        """The placement of `model` in `phase` (KeyError naming both when the plan has none)."""
        for p in self.placements:
            if p.phase == phase and p.model == model:
                return p
        raise KeyError(f"the device plan has no {model!r} in phase {phase!r}")

    @property
    def budget_gib(self) -> float:
        """GPU memory the phases may allocate (card minus the CUDA reserve); 0 without CUDA."""
        return max(self.hardware.gpu_gib - CUDA_RESERVE_GIB, 0.0) if self.hardware.cuda else 0.0

    def peak_gib(self, phase: str, device: str = "cuda") -> float:
        """Sum over the models resident on `device` during `phase`."""
        return round(sum(p.gib for p in self.placements if p.phase == phase and p.device == device), 2)

    @property
    def fits(self) -> bool:
        """Every phase's GPU peak within the budget (always True on CPU)."""
        return not self.hardware.cuda or all(self.peak_gib(ph) <= self.budget_gib for ph in PHASES)

    def table(self) -> str:
        """The plan as a text table, one row per model and phase, with each phase's GPU peak."""
        head = (f"device plan · profile {self.profile} · {self.hardware.name}"
                f"{f' ({self.hardware.gpu_gib:g} GiB, budget {self.budget_gib:g})' if self.hardware.cuda else ''}"
                f" · {self.resolution}² · precision {self.precision}"
                f"{' · tiled VAE' if self.tiled_vae else ''}")
        rows = [f"{'phase':<19} {'model':<13} {'device':<6} {'dtype':<9} {'est. GiB':>8}  note"]
        for ph in PHASES:
            for p in (p for p in self.placements if p.phase == ph):
                rows.append(f"{p.phase:<19} {p.model:<13} {p.device:<6} {p.dtype:<9} {p.gib:>8.2f}  {p.note}")
            if self.hardware.cuda:
                peak = self.peak_gib(ph)
                mark = "ok" if peak <= self.budget_gib else "DOES NOT FIT"
                rows.append(f"{'':<19} {'= GPU peak':<13} {'':<6} {'':<9} {peak:>8.2f}  {mark}")
        return "\n".join([head, *rows, *self.advice()])

    def advice(self) -> list[str]:
        """What to change when training does not fit the card (empty when it does)."""
        if self.train_resolution is None or self.train_resolution >= self.resolution:
            return []
        if self.train_resolution < 512:
            return [f"training at {self.resolution}² does not fit this card, nor does any size from 512²: "
                    "use a bigger card"]
        return [f"training at {self.resolution}² does not fit this card: train at {self.train_resolution}² "
                f"(resolution: {self.train_resolution}) or use a bigger card"]

    def frame(self) -> Any:
        """The plan as a pandas table (phase, model, device, dtype, est. GiB, note) for a notebook."""
        import pandas as pd

        cols = ["phase", "model", "device", "dtype", "gib", "note"]
        rows = [[getattr(p, c) for c in cols] for p in self.placements]
        return pd.DataFrame(rows, columns=cols).rename(columns={"gib": "est. GiB"})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json and manifests."""
        return {"profile": self.profile, "hardware": asdict(self.hardware), "resolution": self.resolution,
                "precision": self.precision, "tiled_vae": self.tiled_vae, "budget_gib": self.budget_gib,
                "fits": self.fits, "train_resolution": self.train_resolution,
                "placements": [asdict(p) for p in self.placements],
                "gpu_peak_gib": {ph: self.peak_gib(ph) for ph in PHASES} if self.hardware.cuda else {}}


def _gib(params: int, dtype: str) -> float:
    return params * {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[dtype] / GIB


def cpu_seconds_per_prompt(gflops: float = CPU_GFLOPS) -> float:
    """Estimated seconds for ChatGLM3-6B to encode one prompt on a CPU of `gflops`."""
    return TEXT_FLOPS_PER_PROMPT / (gflops * 1e9)


def _half(cfg: Config, hw: Hardware, gpu: bool) -> tuple[str, str]:
    """(weights dtype, Lightning precision) for the UNet."""
    precision = str(cfg.train.precision)
    if "32" in precision and not precision.startswith("bf16"):
        return "float32", precision
    if not gpu:
        # fp16 convolutions on CPU are slow and partly missing: 16-mixed keeps fp32 weights there
        return ("bfloat16", precision) if precision.startswith("bf16") else ("float32", precision)
    if precision.startswith("bf16") and hw.bf16:
        return "bfloat16", precision
    return "float16", "16-mixed"  # a card without bf16 (T4) trains in fp16 with a grad scaler


def _text_encoder(cfg: Config, hw: Hardware, gpu: bool, half: str, budget: float, phase: str) -> Placement:
    """ChatGLM3-6B: on the GPU in 16-bit if it fits alone, else 8-bit (bitsandbytes), else on the CPU."""
    params = _scaled_params(cfg, "text_encoder")
    act = ACTIVATIONS_1024["text"]
    if not gpu:
        return Placement(phase, "text_encoder", "cpu", half, round(_gib(params, half) + act, 2))
    fp16 = _gib(params, half) + act
    if fp16 <= budget:
        return Placement(phase, "text_encoder", "cuda", half, round(fp16, 2))
    int8 = (_gib(params - CHATGLM_NON_LINEAR, "int8") + _gib(CHATGLM_NON_LINEAR, "float16")
            if params > CHATGLM_NON_LINEAR else _gib(params, "int8")) + act
    if hw.int8 and int8 <= budget:
        return Placement(phase, "text_encoder", "cuda", "int8", round(int8, 2), "bitsandbytes LLM.int8")
    secs = cpu_seconds_per_prompt()
    return Placement(phase, "text_encoder", "cpu", "bfloat16", round(fp16, 2),
                     f"does not fit the GPU: CPU, ~{secs:.0f} s/prompt (2 cores, AVX-512 bf16), once per prompt")


def _scaled_params(cfg: Config, model: str) -> int:
    """Parameter count of `model` for this profile (the tiny profile's models are tiny)."""
    return (TINY_PARAMS if cfg.profile == "tiny" else PARAMS)[model]


def device_plan(cfg: Config, hardware: Hardware | None = None) -> Plan:
    """Place every model of every phase for cfg's profile on `hardware` (default: this machine)."""
    hw = hardware or Hardware.detect()
    gpu = hw.cuda and str(cfg.device).startswith("cuda")
    dev = "cuda" if gpu else "cpu"
    half, precision = _half(cfg, hw, gpu)
    budget = max(hw.gpu_gib - CUDA_RESERVE_GIB, 0.0) if gpu else float("inf")
    px = (cfg.resolution / 1024) ** 2
    batch = cfg.train.batch_size
    unet = _gib(_scaled_params(cfg, "unet"), half)
    lora = LORA_PARAMS_PER_RANK * cfg.lora.rank * 16 / GIB  # fp32 weight + grad + 2 AdamW moments
    act_train = ACTIVATIONS_1024["train" if cfg.train.gradient_checkpointing else "train_no_ckpt"] * px * batch
    dec = _gib(_scaled_params(cfg, "vae_decoder"), "float32")
    enc = _gib(_scaled_params(cfg, "vae_encoder"), "float32")
    # tile the VAE when the untiled decode would not fit beside the training UNet and its LoRA state
    tiled = gpu and unet + lora + dec + ACTIVATIONS_1024["vae_decode"] * px > budget
    vae_act = ACTIVATIONS_1024["vae_decode_tiled" if tiled else "vae_decode"] * px
    enc_act = ACTIVATIONS_1024["vae_encode_tiled" if tiled else "vae_encode"] * px * batch
    vae_note = "fp32: DiffSynth upcasts SDXL VAEs" + (", tiled" if tiled else "")
    p = [
        _text_encoder(cfg, hw, gpu, half, budget, "cache-captions"),
        Placement("cache-latents", "vae_encoder", dev, "float32", round(enc + enc_act, 2),
                  vae_note + " (fp16-fix VAE)"),
        Placement("train", "unet", dev, half, round(unet + act_train, 2), "frozen; activations"
                  + (" with gradient checkpointing" if cfg.train.gradient_checkpointing else "")),
        Placement("train", "lora", dev, "float32", round(lora, 2), f"rank {cfg.lora.rank}: weights, grads, AdamW"),
        Placement("validate", "unet", dev, half, round(unet + ACTIVATIONS_1024["denoise"] * px, 2),
                  "the training UNet, no_grad"),
        Placement("validate", "lora", dev, "float32", round(lora, 2), "stays resident (AdamW state)"),
        Placement("validate", "vae_decoder", dev, "float32", round(dec + vae_act, 2), vae_note + " (fp16-fix VAE)"),
        _text_encoder(cfg, hw, gpu, half, budget, "storyboard-encode"),
        Placement("storyboard-denoise", "unet", dev, half, round(unet + ACTIVATIONS_1024["denoise"] * px, 2),
                  "LoRA merged into the weights"),
        Placement("storyboard-denoise", "vae_decoder", dev, "float32", round(dec + vae_act, 2), vae_note),
        # fp32: the challenge scored in fp32; fp16 would move scores near the gate
        Placement("score", "aesthetic", dev, "float32",
                  round(_gib(_scaled_params(cfg, "aesthetic"), "float32") + ACTIVATIONS_1024["score"], 2),
                  "CLIP ViT-L/14 + linear head"),
    ]
    act = ACTIVATIONS_1024["train" if cfg.train.gradient_checkpointing else "train_no_ckpt"] * batch
    return Plan(cfg.profile, hw if gpu else Hardware(False, ram_gib=hw.ram_gib), cfg.resolution, precision,
                tiled, p, _train_resolution(cfg.resolution, budget - unet - lora, act) if gpu else None)


def _train_resolution(resolution: int, room_gib: float, act_1024: float) -> int:
    """The largest side (a multiple of 64, at most `resolution`) whose training activations fit `room_gib`."""
    if room_gib <= 0:
        return 0
    side = int(1024 * math.sqrt(room_gib / act_1024)) // 64 * 64
    return min(resolution, side)


def caption_device(cfg: Config) -> str:
    """Where step 02's captioner (Qwen2-VL) runs: filter.caption_device, else cfg.device; CPU without CUDA.

    Step 02 runs before any Kolors phase and alone, so it needs no memory budget from the plan.
    """
    from kolors_lib.core.devices import resolve_device

    return resolve_device(cfg.filter.caption_device or cfg.device)


def to_int8(model: Any, device: str = "cuda") -> Any:
    """Swap `model`'s Linear layers for bitsandbytes LLM.int8 ones and move it to `device` (quantises there).

    Used for ChatGLM3-6B when the plan says int8: only on CUDA, only with bitsandbytes installed.
    """
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child.out_features != PADDED_VOCAB:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                layer.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.to(torch.float16), requires_grad=False)
                setattr(parent, name, layer)
    return model.to(device)

