"""Command line: `python -m kolors_lib COMMAND ...`, one sub-command per course step."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kolors_lib.args import (
    add_common,
    build_export_parser,
    build_publish_parser,
    build_score_parser,
    build_storyboard_parser,
    build_train_parser,
)
from kolors_lib.config import Config, ConfigError, load_config, read_yaml


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m kolors_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-kolors", help="write a tiny random-weight Kolors in the real file layout")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="rewrite even if the same tiny model is there")
    tiny.add_argument("--size", choices=("tiny", "full"), default="tiny",
                      help="full: real-size random weights in the exact Kwai-Kolors/Kolors layout (~17 GB, fp16)")

    plan = sub.add_parser("plan", help="which model runs where, in which dtype, with how much memory (loads nothing)")
    add_common(plan)
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="plan for a CUDA card with this much memory (default: this machine's)")
    plan.add_argument("--no-bf16", action="store_true", help="the card has no bf16 (e.g. a T4)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    models = sub.add_parser("models", help="resolve (download or find) the profile's models and print their folders")
    add_common(models)

    data = sub.add_parser("data", help="step 01 (import) and step 02 (filter) of the course")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import", help="import images into <workdir>/data/raw")
    imp.add_argument("src", nargs="?", default=None,
                     help="local image folder (default: the profile's dataset, e.g. ModelScope lowres_anime)")
    add_common(imp)
    filt = data_sub.add_parser("filter", help="clean <workdir>/data/raw with Data-Juicer into DiffSynth's layout")
    add_common(filt)
    filt.add_argument("--executor", choices=("default", "ray"), default=None,
                      help="Data-Juicer executor (ray: same recipe on a local Ray cluster)")


    build_train_parser(sub.add_parser("train", help="step 03: train the Kolors LoRA (cached text + latents)"))

    build_publish_parser(sub.add_parser(
        "publish", help="step 06: assemble the model page and upload it to ModelScope (--dry-run shows the plan)"))
    build_storyboard_parser(sub.add_parser(
        "storyboard", help="step 04: render the 8-panel story with the LoRA (grid + reproducible manifest)"))
    build_score_parser(sub.add_parser(
        "score", help="step 05: aesthetic score per panel, the mean vs the gate, style consistency"))

    build_export_parser(sub.add_parser(
        "export-lora", help="convert a LoRA to diffsynth, diffusers (ComfyUI wrapper) or kohya (ComfyUI/WebUI) naming"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a list of arguments (the process's own when None)."""
    return build_parser().parse_args(argv)


def _config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The course config; a `--config` that is a Data-Juicer recipe is returned separately."""
    recipe = None
    path = args.config
    if path is not None and "process" in read_yaml(path):
        recipe, path = path.resolve(), None
    return load_config(path, profile=args.profile, workdir=args.workdir), recipe


def _run(args: argparse.Namespace) -> int:
    if args.command == "tiny-kolors":
        if args.size == "full":
            from kolors_lib.fullsize import write_full_kolors as write_kolors
        else:
            from kolors_lib.tiny import write_tiny_kolors as write_kolors

        out = write_kolors(args.dir, seed=args.seed, overwrite=args.overwrite)
        print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
        return 0
    if args.command == "train":
        from kolors_lib.training import run_train

        return run_train(args)
    if args.command == "publish":
        from kolors_lib.publish import run_publish

        return run_publish(args)
    if args.command == "storyboard":
        from kolors_lib.generation import run_storyboard

        return run_storyboard(args)
    if args.command == "score":
        from kolors_lib.scoring import run_score

        return run_score(args)
    if args.command == "export-lora":
        from kolors_lib.export import export_lora

        print(export_lora(args.src, args.fmt, args.dest, alpha=args.alpha))
        return 0
    cfg, recipe = _config(args)
    if args.command == "models":
        from kolors_lib.models import resolve_model

        print(json.dumps({k: str(resolve_model(cfg, k)) for k in ("kolors", "vae_fp16_fix", "aesthetic")}, indent=2))
        return 0
    if args.data_command == "import":
        from kolors_lib.data import import_dataset

        result = import_dataset(cfg, args.src)
        print(f"imported {result.count} images into {result.raw_dir} ({len(result.skipped)} skipped)")
        for row in result.skipped:
            print(f"  skipped {row['source']}: {row['reason']}")
        return 0
    from kolors_lib.filtering import filter_dataset

    result = filter_dataset(cfg, recipe=recipe, executor=args.executor)
    print(f"kept {result.kept} images in {result.train_dir}; report: {result.report_path}")
    for op in result.ops:
        print(f"  {op['op']}: removed {op['removed']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; known errors end with a one-line message and exit code 2."""
    args = parse_args(argv)
    if args.command == "plan":  # before the imports below: the plan needs no torch
        from kolors_lib.plan import run_plan

        try:
            return run_plan(args)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from kolors_lib.data import DataError
    from kolors_lib.export import LoraError
    from kolors_lib.filtering import FilterError
    from kolors_lib.models import ModelUnavailableError

    try:
        return _run(args)
    except (ConfigError, DataError, FilterError, ModelUnavailableError, LoraError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
