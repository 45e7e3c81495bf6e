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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from kolors_lib.core.config import Config
from kolors_lib.core.errors import ConfigError
from kolors_lib.core.settings import QUANTIZATIONS

GIB = 2**30

# Parameters of the real models (diffsynth 1.1.9 classes, counted on the meta device; tests
# recount them): Kolors UNet, ChatGLM3-6B, the SDXL VAE halves, the aesthetic predictor
# (CLIP ViT-L/14 vision tower + projection + MLP head).
PARAMS = {"unet": 2_579_458_820, "text_encoder": 6_243_584_000, "vae_encoder": 34_163_664,
          "vae_decoder": 49_490_199, "aesthetic": 304_894_177}
# The tiny profile's random models (kolors_lib.offline_models.tiny; tests recount them)
TINY_PARAMS = {"unet": 14_210_564, "text_encoder": 8_397_376, "vae_encoder": 580_688, "vae_decoder": 819_191,
               "aesthetic": 199_265}
# ChatGLM's word embedding and output layer stay 16-bit under int8 (2 x 65024 x 4096)
CHATGLM_NON_LINEAR = 532_676_608
# Weights of the Kolors UNet's nn.Linear layers: what int8/nf4 quantise (87 %; convolutions, norms stay 16-bit)
UNET_LINEAR = 2_244_640_768
# bytes per quantised weight: int8 + a per-row scale (negligible); NF4 half a byte + an fp32 absmax per 64
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}
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
# A 1024² training step over the int8 base took 0.62 GiB more than over the bf16 base (`make bench`,
# --only quant, then cpu-1024-int8 with FrozenInt8Linear: 4.89 vs 4.27 GiB over the weights, host RSS;
# per-layer dequantised weights, perhaps allocator slack): counted for every quantised training base
QUANT_TRAIN_EXTRA = 0.62
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
    int8: bool = False  # torchao installed: int8 UNet base and 8-bit ChatGLM
    name: str = "CPU"
    nf4: bool = False  # bitsandbytes installed: 4-bit (NF4) UNet base, CUDA only

    @classmethod
    def detect(cls) -> Hardware:
        """This machine, as torch sees it."""
        import torch

        ram = host_ram_gib()
        if not torch.cuda.is_available():
            return cls(False, ram_gib=ram)
        props = torch.cuda.get_device_properties(0)
        return cls(True, round(props.total_memory / GIB, 1), bool(torch.cuda.is_bf16_supported()), ram,
                   _installed("torchao"), props.name, _installed("bitsandbytes"))

    @classmethod
    def card(cls, gpu_gib: float, bf16: bool = True, ram_gib: float | None = None,
             int8: bool | None = None, nf4: bool | None = None) -> Hardware:
        """A described (not detected) CUDA card: plan for a machine you do not have."""
        return cls(True, float(gpu_gib), bf16, host_ram_gib() if ram_gib is None else ram_gib,
                   _installed("torchao") if int8 is None else int8,
                   f"GPU {gpu_gib:g} GiB{'' if bf16 else ', no bf16'}",
                   _installed("bitsandbytes") if nf4 is None else nf4)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


# the cards learners have (README "Which cards fit"); T4: 15 GiB usable, no bf16
# (torchao and bitsandbytes are in the course's requirements)
CARDS = {"A10 (24 GB, ModelScope)": Hardware(True, 24.0, True, 30.0, True, "A10", True),
         "T4 (16 GB, Colab/Kaggle)": Hardware(True, 15.0, False, 12.0, True, "T4", True),
         "12 GB card": Hardware(True, 12.0, True, 16.0, True, "12 GB", True),
         "8 GB card": Hardware(True, 8.0, True, 16.0, True, "8 GB", True)}


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
    dtype: str  # float32, float16, bfloat16, or int8 / nf4 (quantised linear layers)
    gib: float  # weights + activation peak on `device`
    note: str = ""
    compute_dtype: str = ""  # quantised rows: the dtype of the other weights and of the activations

    @property
    def quantization(self) -> str:
        """none, int8 or nf4: what quantize_base applies after loading."""
        return self.dtype if self.dtype in QUANTIZATIONS else "none"

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype to load the weights in (quantised rows: their compute dtype, then quantised)."""
        import torch

        return getattr(torch, self.compute_dtype or ("float16" if self.quantization != "none" else self.dtype))


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
    return params * {"float32": 4, "float16": 2, "bfloat16": 2, **QUANT_BYTES}[dtype] / GIB


def check_quantization(method: str | None, device: str, where: str = "train.base_quantization") -> str | None:
    """`method` (None: the plan's choice) if it can run on `device`, else a one-line ConfigError saying what to set."""
    if method is None:
        return None
    if method not in QUANTIZATIONS:
        raise ConfigError(f"{where}: {method!r} is not one of {', '.join(QUANTIZATIONS)}")
    if method == "nf4" and not str(device).startswith("cuda"):
        raise ConfigError(f"{where}: nf4 needs a CUDA GPU (bitsandbytes 4-bit); on {device} use int8 or none")
    return method


def unet_weights_gib(params: int, quantization: str, half: str) -> float:
    """The UNet's weights: 16-bit, or its linear layers quantised and the rest in `half`."""
    if quantization == "none":
        return _gib(params, half)
    linear = round(params * UNET_LINEAR / PARAMS["unet"])  # the tiny UNet: the real share
    return _gib(linear, quantization) + _gib(params - linear, half)


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


def text_encoder_placement(cfg: Config, phase: str, device: str, dtype: str) -> Placement:
    """ChatGLM3-6B on `device` in `dtype` (float16, bfloat16, float32 or int8) with its estimated memory."""
    params = _scaled_params(cfg, "text_encoder")
    act = ACTIVATIONS_1024["text"]
    if dtype != "int8":
        return Placement(phase, "text_encoder", device, dtype, round(_gib(params, dtype) + act, 2))
    int8 = (_gib(params - CHATGLM_NON_LINEAR, "int8") + _gib(CHATGLM_NON_LINEAR, "float16")
            if params > CHATGLM_NON_LINEAR else _gib(params, "int8")) + act
    return Placement(phase, "text_encoder", device, "int8", round(int8, 2),
                     "torchao weight-only int8 linears, embeddings float16", "float16")


def _text_encoder(cfg: Config, hw: Hardware, gpu: bool, half: str, budget: float, phase: str) -> Placement:
    """ChatGLM3-6B: on the GPU in 16-bit if it fits alone, else in int8 (torchao) if that fits, else on the CPU."""
    if not gpu:
        return text_encoder_placement(cfg, phase, "cpu", half)
    fp16 = text_encoder_placement(cfg, phase, "cuda", half)
    if fp16.gib <= budget:
        return fp16
    int8 = text_encoder_placement(cfg, phase, "cuda", "int8")
    if hw.int8 and int8.gib <= budget:
        return int8
    secs = cpu_seconds_per_prompt()
    return Placement(phase, "text_encoder", "cpu", "bfloat16", fp16.gib,
                     f"does not fit the GPU: CPU, ~{secs:.0f} s/prompt (2 cores, AVX-512 bf16), once per prompt")


def _base_quantization(asked: str | None, hw: Hardware, gpu: bool, params: int, half: str,
                       room: Callable[[float, str], bool]) -> str:
    """The frozen UNet's quantisation: `asked`, else none where 16-bit fits (`room(weights, method)`), int8, nf4."""
    if asked is not None or not gpu:
        return asked or "none"
    for method, available in (("none", True), ("int8", hw.int8), ("nf4", hw.nf4)):
        if available and room(unet_weights_gib(params, method, half), method):
            return method
    return "int8" if hw.int8 else "none"  # nothing fits: the advice names a smaller size


def _scaled_params(cfg: Config, model: str) -> int:
    """Parameter count of `model` for this profile (the tiny profile's models are tiny)."""
    return (TINY_PARAMS if cfg.profile == "tiny" else PARAMS)[model]


def _unet_row(phase: str, device: str, method: str, half: str, gib: float, note: str) -> Placement:
    """A UNet row: 16-bit, or quantised linear layers (dtype int8/nf4) with the rest in `half`."""
    if method == "none":
        return Placement(phase, "unet", device, half, round(gib, 2), note)
    lib = "torchao weight-only" if method == "int8" else "bitsandbytes"
    return Placement(phase, "unet", device, method, round(gib, 2), f"{lib} {method} linears, rest {half}; {note}", half)


def device_plan(cfg: Config, hardware: Hardware | None = None) -> Plan:
    """Place every model of every phase for cfg's profile on `hardware` (default: this machine)."""
    hw = hardware or Hardware.detect()
    gpu = hw.cuda and str(cfg.device).startswith("cuda")
    dev = "cuda" if gpu else "cpu"
    half, precision = _half(cfg, hw, gpu)
    budget = max(hw.gpu_gib - CUDA_RESERVE_GIB, 0.0) if gpu else float("inf")
    px = (cfg.resolution / 1024) ** 2
    params = _scaled_params(cfg, "unet")
    lora = LORA_PARAMS_PER_RANK * cfg.lora.rank * 16 / GIB  # fp32 weight + grad + 2 AdamW moments
    act = ACTIVATIONS_1024["train" if cfg.train.gradient_checkpointing else "train_no_ckpt"] * cfg.train.batch_size
    extra = QUANT_TRAIN_EXTRA * cfg.train.batch_size  # over a quantised base only
    train_q = _base_quantization(check_quantization(cfg.train.base_quantization, dev), hw, gpu, params, half,
                                 lambda w, q: w + lora + (act + (extra if q != "none" else 0.0)) * px <= budget)
    act += extra if train_q != "none" else 0.0
    unet = unet_weights_gib(params, train_q, half)
    dec = _gib(_scaled_params(cfg, "vae_decoder"), "float32")
    enc = _gib(_scaled_params(cfg, "vae_encoder"), "float32")
    denoise = ACTIVATIONS_1024["denoise"] * px
    # tile the VAE when the untiled decode would not fit beside the validating UNet and its LoRA state
    tiled = gpu and unet + lora + denoise + dec + ACTIVATIONS_1024["vae_decode"] * px > budget
    vae_act = ACTIVATIONS_1024["vae_decode_tiled" if tiled else "vae_decode"] * px
    enc_act = ACTIVATIONS_1024["vae_encode_tiled" if tiled else "vae_encode"] * px * cfg.train.batch_size
    story_q = _base_quantization(check_quantization(cfg.generate.base_quantization, dev, "generate.base_quantization"),
                                 hw, gpu, params, half, lambda w, q: w + denoise + dec + vae_act <= budget)
    story = unet_weights_gib(params, story_q, half)
    vae_note = "fp32: DiffSynth upcasts SDXL VAEs" + (", tiled" if tiled else "")
    ckpt = " with gradient checkpointing" if cfg.train.gradient_checkpointing else ""
    p = [
        _text_encoder(cfg, hw, gpu, half, budget, "cache-captions"),
        Placement("cache-latents", "vae_encoder", dev, "float32", round(enc + enc_act, 2),
                  vae_note + " (fp16-fix VAE)"),
        _unet_row("train", dev, train_q, half, unet + act * px, "frozen; activations" + ckpt),
        Placement("train", "lora", dev, "float32", round(lora, 2), f"rank {cfg.lora.rank}: weights, grads, AdamW"),
        _unet_row("validate", dev, train_q, half, unet + denoise, "the training UNet, no_grad"),
        Placement("validate", "lora", dev, "float32", round(lora, 2), "stays resident (AdamW state)"),
        Placement("validate", "vae_decoder", dev, "float32", round(dec + vae_act, 2), vae_note + " (fp16-fix VAE)"),
        _text_encoder(cfg, hw, gpu, half, budget, "storyboard-encode"),
        _unet_row("storyboard-denoise", dev, story_q, half, story + denoise,
                  "LoRA merged into the weights" if story_q == "none" else "LoRA applied unmerged, fp32"),
        Placement("storyboard-denoise", "vae_decoder", dev, "float32", round(dec + vae_act, 2), vae_note),
        # fp32: the challenge scored in fp32; fp16 would move scores near the gate
        Placement("score", "aesthetic", dev, "float32",
                  round(_gib(_scaled_params(cfg, "aesthetic"), "float32") + ACTIVATIONS_1024["score"], 2),
                  "CLIP ViT-L/14 + linear head"),
    ]
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
