"""Benchmarks on the real-size Kolors architecture with random weights (no download).

    python scripts/bench.py                       # every case, results appended to docs/benchmarks.md
    python scripts/bench.py --only train --resolution 256 --steps 2

Each case runs in its own process so its peak memory is its own: peak GPU memory
(torch.cuda.max_memory_allocated) on a GPU, else peak resident host memory (ru_maxrss).

Training (issue: fit a 16 GB GPU): our step (cached text + latents: UNet + LoRA only) vs the
stock DiffSynth step (`LightningModelForT2ILoRA.training_step`: ChatGLM encodes the caption and
the VAE encodes the image at every step, the whole pipeline resident).
Generation: one panel with prompt-encode-then-offload (ChatGLM, then UNet + VAE) vs everything
resident, through the course's own KolorsRenderer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("train-ours", "train-stock", "generate-offload", "generate-resident")
PROMPT = "古风，水墨画，一个黑色长发少女，坐在古代书院的教室里，认真听讲"


# ---------------------------------------------------------------- real-size models, random weights


@contextlib.contextmanager
def default_dtype(dtype) -> Iterator[None]:  # noqa: ANN001 - torch dtype
    """Build modules directly in `dtype` (a 6B model built in fp32 first would not fit in RAM)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def randomize_(model, seed: int = 0) -> None:  # noqa: ANN001 - torch module
    """Fill every tensor in place: norms 1, biases 0, weights N(0, 0.02): finite, cheap, deterministic."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(param.dtype))


def real_unet(dtype, device: str):  # noqa: ANN001, ANN201
    """DiffSynth's Kolors UNet (2.58 B parameters) with random weights."""
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
    unet = unet.to_empty(device="cpu").to(dtype)
    randomize_(unet, 1)
    return unet.to(device)


def real_chatglm(dtype, device: str):  # noqa: ANN001, ANN201
    """ChatGLM3-6B with Kolors' config (6.24 B parameters) with random weights."""
    from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel

    from kolors_lib.architecture import CHATGLM_CONFIG

    config = ChatGLMConfig(**{**CHATGLM_CONFIG, "torch_dtype": dtype})
    # empty_init allocates the big layers uninitialised (no slow init); the rotary buffer is computed
    with default_dtype(dtype):
        model = ChatGLMModel(config, empty_init=True)
    randomize_(model, 2)
    return model.eval().to(device)


def real_vae_encoder(device: str):  # noqa: ANN201
    """The SDXL VAE encoder; DiffSynth upcasts it to fp32 on load, as here."""
    import torch
    from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder

    with torch.device("meta"):
        enc = SDXLVAEEncoder()
    enc = enc.to_empty(device="cpu").float()
    randomize_(enc, 3)
    return enc.eval().to(device)


# ---------------------------------------------------------------- measuring


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else this process's peak resident host memory."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed_steps(step, steps: int, device: str) -> list[float]:  # noqa: ANN001
    """Seconds per call of `step()`, after one warm-up call."""
    import torch

    step()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- cases


def train_ours(args: argparse.Namespace) -> dict:
    """Our step: cached text embeddings + latents; only the UNet (+ LoRA) is resident."""
    import torch

    from kolors_lib.config import LoraConfig
    from kolors_lib.training import KolorsLoraModule, inject_lora

    dtype = getattr(torch, args.dtype)
    unet = inject_lora(real_unet(dtype, args.device), LoraConfig(rank=args.rank, alpha=4.0))
    module = KolorsLoraModule(unet, LoraConfig(rank=args.rank, alpha=4.0), gradient_checkpointing=True).to(args.device)
    optimizer = module.configure_optimizers()
    lat = args.resolution // 8
    batch = {"latents": torch.randn(1, 4, lat, lat), "encoder_hidden_states": torch.randn(1, 256, 4096) * 0.1,
             "add_text_embeds": torch.randn(1, 4096) * 0.1}

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.device.startswith("cuda")):
            loss = module.compute_loss({k: v.to(args.device) for k, v in batch.items()})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds_per_step": timed_steps(step, args.steps, args.device)}


def _stock_pipeline(dtype, device: str):  # noqa: ANN001, ANN201
    """The camp's pipeline, as DiffSynth builds it for Kolors, from in-memory real-size models."""
    from diffsynth import ModelManager, SDXLImagePipeline

    manager = ModelManager(torch_dtype=dtype, device=device)
    for name, model in (("kolors_text_encoder", real_chatglm(dtype, device)), ("sdxl_unet", real_unet(dtype, device)),
                        ("sdxl_vae_encoder", real_vae_encoder(device))):
        manager.model.append(model)
        manager.model_path.append(f"random:{name}")
        manager.model_name.append(name)
    with contextlib.redirect_stdout(sys.stderr):
        return SDXLImagePipeline.from_model_manager(manager, device=device)


def train_stock(args: argparse.Namespace) -> dict:
    """DiffSynth's stock step (LightningModelForT2ILoRA): ChatGLM + VAE run inside every step."""
    import torch
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    dtype = getattr(torch, args.dtype)

    class StockKolors(LightningModelForT2ILoRA):
        def __init__(self) -> None:
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=True)
            self.pipe = _stock_pipeline(dtype, args.device)
            self.pipe.scheduler.set_timesteps(1100)
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=args.rank, lora_alpha=4.0,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

        def log(self, *a, **k) -> None:  # no Trainer attached
            pass

    module = StockKolors().to(args.device)
    optimizer = module.configure_optimizers()
    image = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
    batch = {"text": [PROMPT], "image": image.to(args.device)}

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.device.startswith("cuda")):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds_per_step": timed_steps(step, args.steps, args.device)}


def _write_real_kolors(root: Path, dtype) -> Path:  # noqa: ANN001
    """Real-size random Kolors in the checkpoint layout, so generation runs the real loading path."""
    from safetensors.torch import save_file

    from kolors_lib.architecture import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG
    from kolors_lib.files import write_json
    from kolors_lib.tiny import _tokenizer_dir

    kolors = root / "Kolors"
    if (kolors / "done").exists():
        return kolors
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for sub, cls, cfg in (("unet", UNet2DConditionModel, KOLORS_UNET_CONFIG), ("vae", AutoencoderKL, SDXL_VAE_CONFIG)):
        with torch.device("meta"):
            model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        model = model.to_empty(device="cpu").to(dtype)
        randomize_(model, 4)
        (kolors / sub).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(kolors / sub / "diffusion_pytorch_model.safetensors"))
        write_json(cfg, kolors / sub / "config.json")
        del model
    chatglm = real_chatglm(dtype, "cpu")
    chatglm.save_pretrained(kolors / "text_encoder", safe_serialization=True, max_shard_size="4GB")
    for file in _tokenizer_dir().iterdir():
        shutil.copy2(file, kolors / "text_encoder" / file.name)
    (kolors / "done").write_text("ok")
    return kolors


def generate(args: argparse.Namespace, offload: bool) -> dict:
    """One panel through KolorsRenderer (the storyboard's own code), offloaded or resident."""
    import torch

    from kolors_lib.generation import KolorsRenderer

    dtype = getattr(torch, args.dtype)
    root = Path(args.model_dir)
    start = time.perf_counter()
    renderer = KolorsRenderer(root, args.device, dtype, offload_text_encoder=offload)
    renderer.encode([PROMPT], [""])
    assert renderer.unet is not None  # offloaded: phase 2 loads UNet + VAE now, outside the panel time
    loaded = time.perf_counter()
    # a 1-step warm-up panel: first-call kernel set-up and page faults are not per-panel costs
    renderer.render(PROMPT, "", seed=0, steps=1, cfg_scale=4.0, width=args.resolution, height=args.resolution)
    start_panel = time.perf_counter()
    renderer.render(PROMPT, "", seed=1, steps=args.gen_steps, cfg_scale=4.0, width=args.resolution,
                    height=args.resolution)
    return {"seconds_per_panel": time.perf_counter() - start_panel, "seconds_load_and_encode": loaded - start}


def run_case(args: argparse.Namespace) -> None:
    """Child process: run one case, print one JSON line."""
    from kolors_lib.compat import patch_torchvision

    patch_torchvision()
    import torch

    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if args.case == "train-ours":
        out = train_ours(args)
    elif args.case == "train-stock":
        out = train_stock(args)
    else:
        out = generate(args, offload=args.case == "generate-offload")
    out.update(case=args.case, peak_gib=round(peak_memory_gib(args.device), 2))
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver


def machine(device: str) -> str:
    """One line naming the hardware the numbers came from."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"CPU only ({os.cpu_count()} cores, {cpu}, {mem:.0f} GiB RAM), torch {torch.__version__}"


def child(args: argparse.Namespace, case: str, model_dir: Path | None) -> dict:
    """Run `case` in a fresh process; its peak memory is its own."""
    cmd = [sys.executable, __file__, "--case", case, "--device", args.device, "--dtype", args.dtype,
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--rank", str(args.rank),
           "--gen-steps", str(args.gen_steps)]
    if model_dir:
        cmd += ["--model-dir", str(model_dir)]
    print(f"== {case}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        result = {"case": case, "error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail else ''}"}
    else:
        result = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(result), flush=True)  # each result as soon as it is known
    return result


def markdown(args: argparse.Namespace, results: list[dict], command: str) -> str:
    """A results section for docs/benchmarks.md."""
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['case']} | failed: {r['error']} | | |")
            continue
        per = r.get("seconds_per_step") or [r["seconds_per_panel"]]
        mean = sum(per) / len(per)
        if "seconds_per_step" in r:
            timing = f"{mean:.2f} s/step"
        else:
            timing = f"{mean:.2f} s/panel (+ {r['seconds_load_and_encode']:.1f} s loading and encoding)"
        rows.append(f"| {r['case']} | {r['peak_gib']:.2f} | {timing} | {len(per)} |")
    what = "GPU memory allocated" if args.device.startswith("cuda") else "host RSS"
    return "\n".join([
        f"### {dt.date.today().isoformat()} · {machine(args.device)}",
        "",
        f"Command: `{command}`  ",
        f"Settings: {args.resolution}x{args.resolution}, batch 1, LoRA rank {args.rank}, {args.dtype} weights, "
        f"gradient checkpointing, generation {args.gen_steps} steps; peak = {what} of the case's process.",
        "",
        f"| case | peak {what} (GiB) | time | samples |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=("train", "generate"), default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bfloat16 on CPU, float16 on CUDA (16-mixed) by default")
    p.add_argument("--resolution", type=int, default=None, help="1024 on a GPU, 256 on CPU by default")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per case (after 1 warm-up)")
    p.add_argument("--gen-steps", type=int, default=None, help="denoising steps per panel (GPU 50, CPU 2)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if gpu else "bfloat16")
    args.resolution = args.resolution or (1024 if gpu else 256)
    args.gen_steps = args.gen_steps or (50 if gpu else 2)
    if args.case:
        run_case(args)
        return 0
    from kolors_lib.compat import patch_torchvision

    patch_torchvision()
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    if args.only in (None, "train"):
        results += [child(args, "train-ours", None), child(args, "train-stock", None)]
    if args.only in (None, "generate"):
        with tempfile.TemporaryDirectory(prefix="kolors-bench-") as tmp:
            import torch

            print("== writing a real-size random Kolors to disk", flush=True)
            model_dir = _write_real_kolors(Path(tmp), getattr(torch, args.dtype))
            results += [child(args, "generate-offload", model_dir), child(args, "generate-resident", model_dir)]
    section = markdown(args, results, command.strip())
    print(section)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = args.out.read_text(encoding="utf-8") if args.out.exists() else "# Benchmarks\n\n"
    args.out.write_text(existing.rstrip() + "\n\n" + section, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
