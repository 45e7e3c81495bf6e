"""Benchmark the course's own functions on the real-size random Kolors, against DiffSynth's stock code.

    python scripts/bench.py                           # every case; results appended to docs/benchmarks.md
    python scripts/bench.py --only train --resolution 256 --steps 2

The model is the real-size random-weight Kolors in the download's layout
(`python -m kolors_lib tiny-kolors DIR --size full`, written once), loaded by the same code as
a download. Each case runs in its own process, so its peak memory is its own: peak GPU memory
(torch.cuda.max_memory_allocated) on a GPU, else peak resident host memory (ru_maxrss).

- train-ours: `kolors_lib.train.training.train_lora` on profile `full` (device plan: UNet dtype,
  Lightning precision); its text/latent cache is built first in a `cache` case, so the figure
  is the training steps' own. Time per step from a Lightning callback.
- train-stock: DiffSynth's `LightningModelForT2ILoRA.training_step` on the same files, as the
  camp's script builds it (ChatGLM + VAE resident and run at every step).
- generate-ours: `kolors_lib.storyboard.storyboard.render_storyboard` (device plan, encode-then-offload).
- generate-stock: one `SDXLImagePipeline` holding everything, called once per panel.
- cpu-1024 (CPU only): one training step and one denoise step at 1024² (what a GPU would hold);
  cpu-1024-int8: the same over the int8 base (train.base_quantization: int8), with the frozen UNet
  weights' exact size in both (`--only quant` runs the pair; their ratios go into the results).
The FLOP floor of a step is counted (torch's FlopCounterMode, meta device): a UNet forward,
and fwd + bwd (x3) + the checkpointing recompute (x4) for a training step.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CASES = ("cache", "train-ours", "train-stock", "generate-ours", "generate-stock", "cpu-1024", "cpu-1024-int8")
PROMPT = "古风，水墨画，一个黑色长发少女，坐在古代书院的教室里，认真听讲"


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else this process's peak resident host memory."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def unet_flops(resolution: int) -> float:
    """FLOPs of one Kolors UNet forward at resolution² (counted on the meta device, no memory)."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    import torch
    from diffsynth.models.sdxl_unet import SDXLUNet
    from torch.utils.flop_counter import FlopCounterMode

    from kolors_lib.train.denoise import add_time_ids

    with torch.device("meta"):
        unet = SDXLUNet(is_kolors=True)
        x = torch.randn(1, 4, resolution // 8, resolution // 8)
        with FlopCounterMode(display=False) as counter:
            unet(x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 256, 4096),
                 add_text_embeds=torch.randn(1, 4096), add_time_id=add_time_ids(x))
    return float(counter.get_total_flops())


def course_config(args: argparse.Namespace, workdir: Path):  # noqa: ANN201 - kolors_lib Config
    """Profile `full` pointed at the random Kolors, with this run's size and steps (values only)."""
    from kolors_lib.core.config import load_config

    models = Path(args.models)
    precision = "16-mixed" if args.device.startswith("cuda") else "bf16-mixed"
    return load_config(profile="full", workdir=workdir, overrides={
        "device": args.device, "resolution": args.resolution,
        "models": {"kolors": {"local_dir": str(models / "Kolors")},
                   "vae_fp16_fix": {"local_dir": str(models / "sdxl-vae-fp16-fix")},
                   "aesthetic": {"local_dir": str(models / "aesthetics-predictor")}},
        "train": {"steps": args.steps + 1, "precision": precision, "save_every": 0, "validate_every": 0,
                  "base_quantization": "int8" if args.case == "cpu-1024-int8" else "none"},
        "generate": {"steps": args.gen_steps, "width": args.resolution, "height": args.resolution}})


def write_training_set(cfg) -> None:  # noqa: ANN001
    """Two images and DiffSynth's metadata.csv (what step 02 writes)."""
    from PIL import Image

    cfg.train_dir.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate(("red", "teal")):
        Image.new("RGB", (cfg.resolution, cfg.resolution), color).save(cfg.train_dir / f"img_{i}.png")
    (cfg.train_dir / "metadata.csv").write_text(f"file_name,text\nimg_0.png,{PROMPT}\nimg_1.png,{PROMPT}\n",
                                                encoding="utf-8")


def case_train_ours(args: argparse.Namespace, cfg) -> dict:  # noqa: ANN001
    """train_lora through the device plan; seconds per step after the first (warm-up) step."""
    from kolors_lib.train.cache import build_cache
    from kolors_lib.train.training import L, train_lora

    if args.case == "cache":
        write_training_set(cfg)
        start = time.perf_counter()
        build_cache(cfg)
        return {"seconds_cache": time.perf_counter() - start}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *a: object) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, *a: object) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    train_lora(cfg, resume=False, callbacks=[timer])
    return {"seconds_per_step": timer.times[1:]}


def _stock_manager(cfg, dtype, device: str):  # noqa: ANN001, ANN201
    """The camp's ModelManager: ChatGLM, UNet and VAE from the model folder, all on `device`."""
    from kolors_lib.kolors.models import kolors_paths, load_model_manager

    return load_model_manager(kolors_paths(cfg).files(), device=device, dtype=dtype)


def case_train_stock(args: argparse.Namespace, cfg) -> dict:  # noqa: ANN001
    """DiffSynth's stock step (LightningModelForT2ILoRA): ChatGLM + VAE run inside every step."""
    import torch
    from diffsynth import SDXLImagePipeline
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    dtype = torch.float16 if args.device.startswith("cuda") else torch.bfloat16

    class StockKolors(LightningModelForT2ILoRA):
        def __init__(self) -> None:
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=True)
            with contextlib.redirect_stdout(sys.stderr):
                self.pipe = SDXLImagePipeline.from_model_manager(_stock_manager(cfg, dtype, args.device))
            self.pipe.scheduler.set_timesteps(1100)
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

        def log(self, *a: object, **k: object) -> None:  # no Trainer attached
            pass

    module = StockKolors().to(args.device)
    optimizer = module.configure_optimizers()
    batch = {"text": [PROMPT], "image": (torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1).to(args.device)}
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.device.startswith("cuda")):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds_per_step": times[1:]}


def _lora_file(cfg) -> Path:  # noqa: ANN001
    """The LoRA train-ours wrote; else a zero LoRA of the course's shape, built on the meta device."""
    import torch

    from kolors_lib.core.files import save_safetensors
    from kolors_lib.kolors.models import kolors_paths, unet_skeleton
    from kolors_lib.train.lora_module import inject_lora
    from kolors_lib.train.report import lora_metadata

    path = cfg.lora_path
    if not path.is_file():
        unet = inject_lora(unet_skeleton(kolors_paths(cfg).unet), cfg.lora)
        state = {n: torch.zeros(p.shape) for n, p in unet.named_parameters() if p.requires_grad}
        save_safetensors(state, path, lora_metadata(cfg, 0))
    return path


def case_generate_ours(args: argparse.Namespace, cfg) -> dict:  # noqa: ANN001
    """render_storyboard: 8 panels through the device plan (ChatGLM first, then UNet + VAE)."""
    from kolors_lib.storyboard.storyboard import render_storyboard

    lora = _lora_file(cfg)
    start = time.perf_counter()
    result = render_storyboard(cfg, lora_path=lora, progress=False)
    return {"seconds_per_panel": [(time.perf_counter() - start) / len(result.panels)]}


def case_generate_stock(args: argparse.Namespace, cfg) -> dict:  # noqa: ANN001
    """The camp's inference: one resident SDXLImagePipeline, the story's 8 prompts."""
    import torch
    from diffsynth import SDXLImagePipeline

    from kolors_lib.kolors.story import load_story, render_settings, with_trigger

    story = load_story(cfg.generate.story)
    settings = render_settings(cfg, story)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        pipe = SDXLImagePipeline.from_model_manager(_stock_manager(cfg, dtype, args.device))
    for scene in story.scenes:
        pipe(with_trigger(scene.prompt, cfg.filter.trigger_word), negative_prompt=settings.negative,
             cfg_scale=settings.cfg_scale, height=settings.height, width=settings.width,
             num_inference_steps=settings.steps, seed=scene.seed)
    return {"seconds_per_panel": [(time.perf_counter() - start) / len(story.scenes)]}


def reset_peak() -> float:
    """Reset this process's resident high-water mark (Linux clear_refs 5); return the RSS now (GiB)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so new allocations show in RSS
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_kib("VmRSS") / 2**20


def _vm_kib(field: str) -> int:
    """This process's VmRSS / VmHWM in KiB (the rehearsal's /proc reader)."""
    from rehearse import status_kib  # scripts/ is on sys.path when a script runs

    return status_kib(os.getpid(), field)


def case_cpu_1024(args: argparse.Namespace, cfg) -> dict:  # noqa: ANN001
    """One training step and one denoise step at 1024² on the CPU: what they add over the loaded weights.

    The peak of the process is the load (the fp16 file and its bf16 copy are both alive for a moment),
    so the step's own peak is the high-water mark after resetting it once the model is loaded.
    """
    import torch

    from kolors_lib.core.device_plan import device_plan
    from kolors_lib.kolors.quantize import tensor_bytes
    from kolors_lib.train.denoise import add_time_ids
    from kolors_lib.train.lora_module import KolorsLoraModule

    plan = device_plan(cfg)
    module = KolorsLoraModule.from_config(cfg, plan)
    frozen = [p for p in module.unet.parameters() if not p.requires_grad]
    frozen_gib = sum(tensor_bytes(p) for p in frozen) / 2**30
    optimizer = module.configure_optimizers()
    x = torch.randn(1, 4, 128, 128)
    width = module.unet.text_intermediate_proj.in_features  # 4096: ChatGLM3's hidden size
    text = {"encoder_hidden_states": torch.randn(1, 256, width) * 0.1, "add_text_embeds": torch.randn(1, width) * 0.1}
    base = reset_peak()
    start = time.perf_counter()
    module.compute_loss({"latents": x, **text}).backward()
    optimizer.step()
    train_s = time.perf_counter() - start
    train_act = _vm_kib("VmHWM") / 2**20 - base
    optimizer.zero_grad(set_to_none=True)
    base_denoise = reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        dtype = plan.get("train", "unet").torch_dtype
        module.unet.eval()(x.to(dtype), timestep=torch.tensor([500]), add_time_id=add_time_ids(x),
                           **{k: v.to(dtype) for k, v in text.items()})
    return {"seconds_per_step": [train_s], "seconds_denoise_step": time.perf_counter() - start,
            "base_quantization": cfg.train.base_quantization, "unet_frozen_weights_gib": round(frozen_gib, 3),
            "rss_after_load_gib": round(base, 2), "train_step_over_weights_gib": round(train_act, 2),
            "denoise_step_over_weights_gib": round(_vm_kib("VmHWM") / 2**20 - base_denoise, 2)}


def run_case(args: argparse.Namespace) -> None:
    """Child process: run one case, print one JSON line."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    import torch

    torch.manual_seed(0)
    cfg = course_config(args, Path(args.workdir))
    if args.case.startswith("cpu-1024"):
        cfg = course_config(argparse.Namespace(**{**vars(args), "resolution": 1024}), Path(args.workdir))
    cases = {"cache": case_train_ours, "train-ours": case_train_ours, "train-stock": case_train_stock,
             "generate-ours": case_generate_ours, "generate-stock": case_generate_stock, "cpu-1024": case_cpu_1024,
             "cpu-1024-int8": case_cpu_1024}
    out = cases[args.case](args, cfg)
    out.update(case=args.case, peak_gib=round(peak_memory_gib(args.device), 2))
    print("RESULT " + json.dumps(out), flush=True)


def machine(device: str) -> str:
    """One line naming the hardware the numbers came from."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, {mem:.0f} GiB RAM), "
            f"torch {torch.__version__}")


def child(args: argparse.Namespace, case: str) -> dict:
    """Run `case` in a fresh process; its peak memory is its own."""
    cmd = [sys.executable, __file__, "--case", case, "--device", args.device, "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--gen-steps", str(args.gen_steps), "--models", str(args.models),
           "--workdir", str(args.workdir)]
    print(f"== {case}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        result = {"case": case, "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"}
    else:
        result = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(result), flush=True)
    return result


def _mean(r: dict) -> float | None:
    per = r.get("seconds_per_step") or r.get("seconds_per_panel")
    return sum(per) / len(per) if per else None


def quant_ratios(results: dict[str, dict]) -> list[str]:
    """int8 base vs 16-bit base at 1024² (cases cpu-1024-int8 and cpu-1024 of the same run)."""
    a, b = results.get("cpu-1024-int8", {}), results.get("cpu-1024", {})
    if "unet_frozen_weights_gib" not in a or "unet_frozen_weights_gib" not in b:
        return []
    wa, wb = a["unet_frozen_weights_gib"], b["unet_frozen_weights_gib"]
    return [f"- int8 base / bf16 base at 1024²: frozen UNet weights {wa:.3f} / {wb:.3f} GiB = {wa / wb:.3f}; "
            f"training step over the weights {a['train_step_over_weights_gib']:.2f} / "
            f"{b['train_step_over_weights_gib']:.2f} GiB; s/step {_mean(a):.0f} / {_mean(b):.0f} = "
            f"{_mean(a) / _mean(b):.2f}; denoise step {a['seconds_denoise_step']:.0f} / "
            f"{b['seconds_denoise_step']:.0f} s"]


def markdown(args: argparse.Namespace, results: dict[str, dict], command: str, flops: float) -> str:
    """A results section for docs/benchmarks.md: absolutes and ours/stock ratios."""
    what = "GPU memory allocated" if args.device.startswith("cuda") else "host RSS"
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error']} | | |")
            continue
        mean = _mean(r)
        unit = "s/panel" if "seconds_per_panel" in r else "s/step"
        rows.append(f"| {name} | {r['peak_gib']:.2f} | {mean:.2f} {unit} |" if mean is not None else
                    f"| {name} | {r['peak_gib']:.2f} | {r.get('seconds_cache', 0):.1f} s |")
    ratios = []
    for ours, stock in (("train-ours", "train-stock"), ("generate-ours", "generate-stock")):
        a, b = results.get(ours, {}), results.get(stock, {})
        if "peak_gib" in a and "peak_gib" in b:
            ratios.append(f"- {ours.split('-')[0]}: memory ours/stock = {a['peak_gib'] / b['peak_gib']:.2f}, "
                          f"time ours/stock = {_mean(a) / _mean(b):.2f}")
    ratios += quant_ratios(results)
    step = 4 * flops  # forward + backward (2x) + the checkpointing recompute of the forward
    return "\n".join([
        f"### {dt.date.today().isoformat()} · {machine(args.device)}", "",
        f"Command: `{command}`  ",
        f"Settings: {args.resolution}x{args.resolution}, batch 1, LoRA rank 16, gradient checkpointing, "
        f"{args.steps} timed steps (after 1 warm-up), generation {args.gen_steps} steps x 8 panels; "
        f"peak = {what} of the case's process.", "",
        f"| case | peak {what} (GiB) | time |", "|---|---|---|", *rows, "", *ratios, "",
        f"FLOP floor at {args.resolution}²: UNet forward {flops / 1e12:.2f} TFLOP (counted); a training step "
        f"with checkpointing ≈ {step / 1e12:.1f} TFLOP; a panel of N steps with CFG = 2N forwards.", ""])


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=("train", "generate", "cpu-1024", "quant"), default=None,
                   help="quant: cpu-1024 over the 16-bit and over the int8 base, one after the other")
    p.add_argument("--models", type=Path, default=ROOT / "workdir" / "full-kolors",
                   help="the real-size random Kolors (written there first if missing)")
    p.add_argument("--workdir", type=Path, default=ROOT / "workdir" / "bench")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--resolution", type=int, default=None, help="1024 on a GPU, 256 on CPU by default")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per case (after 1 warm-up)")
    p.add_argument("--gen-steps", type=int, default=None, help="denoising steps per panel (GPU 25, CPU 1)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.resolution = args.resolution or (1024 if gpu else 256)
    args.gen_steps = args.gen_steps or (25 if gpu else 1)
    if args.case:
        run_case(args)
        return 0
    from kolors_lib.offline_models.fullsize import write_full_kolors

    if not (args.models / "Kolors" / "model_index.json").is_file():  # any Kolors folder may be measured
        write_full_kolors(args.models)
    command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    names = {None: ["cache", "train-ours", "train-stock", "generate-ours", "generate-stock"],
             "train": ["cache", "train-ours", "train-stock"], "generate": ["generate-ours", "generate-stock"],
             "cpu-1024": [], "quant": []}[args.only]
    if not gpu and args.only in (None, "cpu-1024", "quant"):
        names.append("cpu-1024")
    if not gpu and args.only in (None, "quant"):
        names.append("cpu-1024-int8")
    results = {name: child(args, name) for name in names}
    section = markdown(args, results, command.strip(), unet_flops(args.resolution))
    print(section)
    existing = args.out.read_text(encoding="utf-8") if args.out.exists() else "# Benchmarks\n\n"
    args.out.write_text(existing.rstrip() + "\n\n" + section, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
