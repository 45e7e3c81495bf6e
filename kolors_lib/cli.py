"""Command line: `python -m kolors_lib COMMAND ...`, one sub-command per course step."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kolors_lib.args import (
    TRAIN_OPTIONS,
    add_common,
    build_export_parser,
    build_publish_parser,
    build_score_parser,
    build_storyboard_parser,
    build_train_parser,
)
from kolors_lib.config import Config, load_config, read_yaml
from kolors_lib.errors import ConfigError, CourseError, PublishError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m kolors_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-kolors", help="write a tiny random-weight Kolors in the real file layout")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="rewrite even if the same tiny model is there")

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
    filt.add_argument("--recipe", type=Path, default=None,
                      help="Data-Juicer recipe YAML (default: filter.recipe, configs/data_juicer.yaml)")
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


def _config(args: argparse.Namespace) -> Config:
    """The course config named by --config/--profile/--workdir."""
    if args.config is not None and "process" in read_yaml(args.config):
        raise ConfigError(f"{args.config} is a Data-Juicer recipe, not a course config: pass it with --recipe")
    return load_config(args.config, profile=args.profile, workdir=args.workdir)


def _tiny_kolors(args: argparse.Namespace) -> int:
    from kolors_lib.tiny import write_tiny_kolors

    out = write_tiny_kolors(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    from kolors_lib.models import resolve_model

    cfg = _config(args)
    print(json.dumps({k: str(resolve_model(cfg, k)) for k in ("kolors", "vae_fp16_fix", "aesthetic")}, indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.data_command == "import":
        from kolors_lib.data import import_dataset

        result = import_dataset(cfg, args.src)
        print(f"imported {result.count} images into {result.raw_dir} ({len(result.skipped)} skipped)")
        for row in result.skipped:
            print(f"  skipped {row['source']}: {row['reason']}")
        return 0
    from kolors_lib.filtering import filter_dataset

    result = filter_dataset(cfg, recipe=args.recipe, executor=args.executor)
    print(f"kept {result.kept} images in {result.train_dir}; report: {result.report_path}")
    for op in result.ops:
        print(f"  {op['op']}: removed {op['removed']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from kolors_lib.training import train_lora

    result = train_lora(_config(args), resume=not args.no_resume, steps=args.steps, rank=args.rank,
                        alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        precision=args.precision, resolution=args.resolution, seed=args.seed,
                        save_every=args.save_every, **{k: getattr(args, k) for k in TRAIN_OPTIONS})
    last = result.losses[-1][1] if result.losses else float("nan")
    print(f"trained {result.steps} steps (resumed from {result.resumed_from}) in {result.seconds:.1f} s, "
          f"final loss {last:.4f}\nLoRA: {result.lora_path}\nloss log: {result.loss_csv}")
    return 0


def _storyboard(args: argparse.Namespace) -> int:
    from kolors_lib.generation import render_storyboard, strength_sweep

    cfg = _config(args)
    result = render_storyboard(cfg, args.story, args.strength, args.lora)
    print(f"storyboard: {result.grid}")
    print(f"manifest: {result.manifest}")
    if args.sweep:
        print(f"sweep: {strength_sweep(cfg, 0, story_path=args.story, lora_path=args.lora)}")
    return 0


def _score(args: argparse.Namespace) -> int:
    """Exit 0 on PASS and on FAIL (a low score is a result, printed clearly), 1 on FAIL with --strict."""
    from kolors_lib.scoring import score_folder

    result = score_folder(_config(args), args.dir, device=args.device, gate=args.gate)
    print(result)
    print(f"report: {result.csv_path} and {result.json_path}")
    return 1 if args.strict and not result.passed else 0


def _publish(args: argparse.Namespace) -> int:
    """Without --dry-run the token must be in $MODELSCOPE_API_TOKEN (never an argument)."""
    from kolors_lib.publish import TOKEN_ENV, TOKEN_PAGE, publish, validate_repo_id

    repo_id = validate_repo_id(args.repo_id)
    if not args.dry_run and not os.environ.get(TOKEN_ENV, "").strip():
        raise PublishError(f"no token: uploading needs the environment variable {TOKEN_ENV} (an access token "
                           f"with write permission from {TOKEN_PAGE}, e.g. export {TOKEN_ENV}=...); add "
                           "--dry-run to only see what would be uploaded")
    print(publish(_config(args), repo_id, dry_run=args.dry_run, private=args.private))
    return 0


def _export(args: argparse.Namespace) -> int:
    from kolors_lib.export import export_lora

    print(export_lora(args.src, args.fmt, args.dest, alpha=args.alpha))
    return 0


COMMANDS = {"tiny-kolors": _tiny_kolors, "models": _models, "data": _data, "train": _train,
            "storyboard": _storyboard, "score": _score, "publish": _publish, "export-lora": _export}


def main(argv: Sequence[str] | None = None) -> int:
    """The one dispatcher: run one command; a CourseError ends with one line `error: ...` and exit code 2."""
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CourseError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
