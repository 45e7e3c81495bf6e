"""The GPU check: every phase the device plan estimates, measured on the card in one short run.

    python scripts/gpu_check.py                      # CUDA: real size, 1024², 3 steps; else CPU, 256², 1 step
    python scripts/gpu_check.py --size tiny          # the tiny random Kolors (seconds; what the test runs)
    python scripts/gpu_check.py --out $OUT/gpu_check.json

Nothing is downloaded: it writes the random Kolors of `--size` (the real-size one is the download's
layout at real size, ~17 GB, loaded by the same code as a download), then, each phase after freeing the
last: the text/latent cache (fp16, bf16), `train_lora` for `--steps` steps in fp16 and bf16, each over
the 16-bit and over the int8 base, one storyboard panel, and ChatGLM over 8 prompts in fp16 and int8.
Per phase it prints the measured peak (CUDA: torch.cuda.max_memory_allocated; CPU: the process's
resident high-water mark over its level at the phase's start) and seconds beside the device plan's
estimate, and writes everything, each plan row with its device and dtype, to a JSON after every phase.
Phases not started by --deadline-s are recorded as skipped, so the run fits a short lease.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
PROMPTS = ["古风，水墨画，一个黑色长发少女，坐在古代书院的教室里，认真听讲",
           "a red lantern over a stone bridge at dusk",
           "古风，水墨画，少女在竹林中抚琴", "a cat asleep on a windowsill, morning light",
           "古风，水墨画，山间小路，远处有一座寺庙", "a lighthouse in a storm, oil painting",
           "古风，水墨画，少女站在船头，江上起雾", "a bowl of noodles on a wooden table, photo"]
GIB = 2**30


class Meter:
    """Peak memory and seconds of one phase: CUDA's allocator peak, else the resident high-water mark."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self) -> Meter:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = 0.0
        else:
            from bench import reset_peak

            self.base = reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self.seconds = time.perf_counter() - self.start
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / GIB
        else:
            from rehearse import status_kib

            self.peak = status_kib(os.getpid(), "VmHWM") / 2**20 - self.base


def build_models(args: argparse.Namespace) -> dict[str, Path]:
    """The random Kolors of --size under --models (written once; a marker file says it is complete)."""
    if args.size == "tiny":
        from kolors_lib.offline_models.tiny import write_tiny_kolors

        return write_tiny_kolors(args.models)
    from kolors_lib.offline_models.fullsize import write_full_kolors

    return write_full_kolors(args.models)


def config(args: argparse.Namespace, models: dict[str, Path], precision: str, quant: str | None = None) -> Any:
    """Profile full (tiny for --size tiny) on this run's models, size and steps, with one precision and base."""
    from kolors_lib.core.config import load_config

    train = {"steps": args.steps, "precision": precision, "save_every": 0, "validate_every": 0}
    if quant is not None:
        train["base_quantization"] = quant
    return load_config(profile="tiny" if args.size == "tiny" else "full", workdir=args.workdir, overrides={
        "device": args.device, "resolution": args.resolution, "train": train,
        "models": {key: {"local_dir": str(models[key])} for key in ("kolors", "vae_fp16_fix", "aesthetic")},
        "generate": {"steps": args.gen_steps, "width": args.resolution, "height": args.resolution}})


def plan_rows(plan: Any, phases: tuple[str, ...], device: str) -> tuple[float, list[dict[str, Any]]]:
    """The plan's estimate for these phases (their largest peak on `device`) and their rows."""
    rows = [asdict(p) for p in plan.placements if p.phase in phases]
    return max(plan.peak_gib(ph, device) for ph in phases), rows


def phase_cache(args: argparse.Namespace, models: dict[str, Path], precision: str) -> tuple[float, list[dict]]:
    """Step 03's cache: ChatGLM over the captions, then the VAE encoder over the images."""
    from bench import write_training_set

    from kolors_lib.core.device_plan import device_plan
    from kolors_lib.train.cache import build_cache

    cfg = config(args, models, precision)
    write_training_set(cfg)
    plan = device_plan(cfg)
    build_cache(cfg, plan=plan)
    return plan_rows(plan, ("cache-captions", "cache-latents"), args.plan_device)


def phase_train(args: argparse.Namespace, models: dict[str, Path], precision: str, quant: str) -> tuple[float, list]:
    """train_lora for --steps steps (its cache is already built: the peak is the training's own)."""
    from kolors_lib.core.device_plan import device_plan
    from kolors_lib.train.training import train_lora

    cfg = config(args, models, precision, quant)
    train_lora(cfg, resume=False)
    return plan_rows(device_plan(cfg), ("train",), args.plan_device)


def phase_panel(args: argparse.Namespace, models: dict[str, Path]) -> tuple[float, list[dict]]:
    """One storyboard panel with the last trained LoRA, every model where the plan puts it."""
    from kolors_lib.core.device_plan import device_plan
    from kolors_lib.storyboard.storyboard import render

    cfg = config(args, models, "16-mixed")
    render(cfg, PROMPTS[0], lora_path=cfg.lora_path, name="gpu-check", progress=False)
    return plan_rows(device_plan(cfg), ("storyboard-encode", "storyboard-denoise"), args.plan_device)


def phase_chatglm(args: argparse.Namespace, models: dict[str, Path], dtype: str) -> tuple[float, list[dict]]:
    """ChatGLM over 8 prompts in `dtype` (float16 or int8) on the plan's device, no prompt cache."""
    import torch

    from kolors_lib.core.device_plan import text_encoder_placement
    from kolors_lib.kolors.renderer import KolorsRenderer

    cfg = config(args, models, "16-mixed")
    place = text_encoder_placement(cfg, "storyboard-encode", args.device, dtype)
    renderer = KolorsRenderer(models["kolors"], args.device, torch.float16, True, place)
    renderer.encode(PROMPTS, [""])
    if renderer.encoded != len(PROMPTS) + 1:
        raise RuntimeError(f"encoded {renderer.encoded} prompts, expected {len(PROMPTS) + 1}")
    return place.gib, [asdict(place)]


def phases(args: argparse.Namespace, models: dict[str, Path]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, run) for every phase, in order; bf16 ones only where the device has bf16."""
    out: list[tuple[str, Callable[[], Any]]] = []
    for precision in args.precisions:
        out.append((f"cache {precision}", lambda p=precision: phase_cache(args, models, p)))
    for precision in args.precisions:
        for quant in ("none", "int8"):
            run = lambda p=precision, q=quant: phase_train(args, models, p, q)  # noqa: E731
            out.append((f"train {precision} base {quant}", run))
    out.append(("storyboard panel", lambda: phase_panel(args, models)))
    for dtype in ("float16", "int8"):
        out.append((f"chatglm x{len(PROMPTS)} {dtype}", lambda d=dtype: phase_chatglm(args, models, d)))
    return out


def machine(cuda: bool) -> dict[str, Any]:
    """What ran: the card (or CPU), torch, and whether bf16 exists there."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_gib=round(props.total_memory / GIB, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every phase once, measured; the JSON is rewritten after each so an interrupted run keeps what it measured."""
    from kolors_lib.core.files import write_json

    report: dict[str, Any] = {"machine": machine(args.cuda), "size": args.size, "resolution": args.resolution,
                              "steps": args.steps, "device": args.device, "phases": []}
    begin = time.perf_counter()
    with Meter(args.cuda) as meter:
        models = build_models(args)
    report["phases"].append({"phase": "build models", "seconds": round(meter.seconds, 1)})
    for name, step in phases(args, models):
        entry: dict[str, Any] = {"phase": name}
        if time.perf_counter() - begin > args.deadline_s:
            entry["skipped"] = f"past --deadline-s {args.deadline_s:g}"
        else:
            try:
                with Meter(args.cuda) as meter:
                    estimate, rows = step()
                entry.update(measured_gib=round(meter.peak, 2), estimate_gib=round(estimate, 2),
                             seconds=round(meter.seconds, 1), plan_rows=rows)
            except Exception as err:  # noqa: BLE001 - one failing phase must not cost the others
                entry["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
                traceback.print_exc()
        report["phases"].append(entry)
        print(line(entry), flush=True)
        write_json(report, args.out)
    report["seconds"] = round(time.perf_counter() - begin, 1)
    write_json(report, args.out)
    return report


def line(entry: dict[str, Any]) -> str:
    """One row of the printed table: phase, measured vs estimated GiB, seconds (or why not)."""
    if "measured_gib" in entry:
        return (f"{entry['phase']:<28} measured {entry['measured_gib']:7.2f} GiB   "
                f"plan {entry['estimate_gib']:7.2f} GiB   {entry['seconds']:7.1f} s")
    return f"{entry['phase']:<28} {entry.get('error') or entry.get('skipped')}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with the defaults of this machine: CUDA → real size at 1024², else 256² on the CPU."""
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="which random Kolors (default full)")
    p.add_argument("--models", type=Path, default=None, help="where it is written (default WORKDIR/models-SIZE)")
    p.add_argument("--workdir", type=Path, default=ROOT / "workdir" / "gpu-check")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default WORKDIR/gpu_check.json)")
    p.add_argument("--resolution", type=int, default=None, help="1024 with CUDA, else 256")
    p.add_argument("--steps", type=int, default=None, help="training steps per run: 3 with CUDA, else 1")
    p.add_argument("--gen-steps", type=int, default=None, help="denoising steps of the panel: 25 with CUDA, else 1")
    p.add_argument("--deadline-s", type=float, default=450.0, help="start no phase after this many seconds")
    args = p.parse_args(argv)
    args.cuda = torch.cuda.is_available()
    args.device = args.plan_device = "cuda" if args.cuda else "cpu"
    args.resolution = args.resolution or (1024 if args.cuda else 256)
    args.steps = args.steps or (3 if args.cuda else 1)
    args.gen_steps = args.gen_steps or (25 if args.cuda else 1)
    args.models = args.models or args.workdir / f"models-{args.size}"
    args.out = args.out or args.workdir / "gpu_check.json"
    bf16 = not args.cuda or torch.cuda.is_bf16_supported()
    args.precisions = ["16-mixed", "bf16-mixed"] if bf16 else ["16-mixed"]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the check, print the table, exit 1 when a phase failed."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    args = parse(argv)
    print(f"GPU check · {args.size} Kolors · {args.resolution}² · {args.steps} step(s) · {args.device}", flush=True)
    report = run(args)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 1 if any("error" in e for e in report["phases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
