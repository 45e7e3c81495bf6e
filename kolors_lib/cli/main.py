"""Command line: `python -m kolors_lib COMMAND ...`, one sub-command per course step."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kolors_lib.cli.args import (
    TRAIN_OPTIONS,
    add_common,
    build_export_parser,
    build_publish_parser,
    build_render_parser,
    build_score_parser,
    build_story_parser,
    build_storyboard_parser,
    build_tiny_parser,
    build_train_parser,
)
from kolors_lib.core.checks import finite, output_name
from kolors_lib.core.checks import seed as checked_seed
from kolors_lib.core.config import Config, load_config, read_yaml
from kolors_lib.core.errors import ConfigError, CourseError, PublishError, os_error_line
from kolors_lib.core.inputs import lora_file, train_metadata, training_overrides
from kolors_lib.core.lock import step_lock
from kolors_lib.kolors.story import load_story


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(prog="python -m kolors_lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    build_tiny_parser(sub.add_parser("tiny-kolors", help="write a tiny random-weight Kolors in the real file layout"))

    plan = sub.add_parser("plan", help="which model runs where, in which dtype, with how much memory (loads nothing)")
    add_common(plan)
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="plan for a CUDA card with this much memory (default: this machine's)")
    plan.add_argument("--no-bf16", action="store_true", help="the card has no bf16 (e.g. a T4)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    models = sub.add_parser("models", help="resolve (download or find) the profile's models and print their folders")
    add_common(models)
    models.add_argument("--dry-run", action="store_true",
                        help="download nothing: list the files each model would fetch, with the hub's sizes")

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
        "storyboard", help="step 04: render the story with the LoRA, a panel per scene (grid + manifest)"))
    build_render_parser(sub.add_parser(
        "render", help="one prompt at one or more LoRA strengths and seeds (images + grid in <workdir>/renders)"))
    build_story_parser(sub.add_parser(
        "story", help="story files: `story draft SCENES.txt` drafts the 8 prompts with an LLM (the camp's template)"))
    build_score_parser(sub.add_parser(
        "score", help="step 05: aesthetic score per panel, the mean vs the gate, style consistency"))

    build_export_parser(sub.add_parser(
        "export-lora", help="convert a LoRA to diffsynth, diffusers (ComfyUI wrapper) or kohya (ComfyUI/WebUI) naming"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a list of arguments (the process's own when None)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Python 3.11's argparse gives both optional positionals of `export-lora IN --format F OUT` to the
    # first chunk (IN, and nothing as OUT), leaving OUT over: it is OUT
    if args.command == "export-lora" and args.dest is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.dest, extra = Path(extra[0]), []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _config(args: argparse.Namespace) -> Config:
    """The course config named by --config/--profile/--workdir."""
    if args.config is not None and "process" in read_yaml(args.config):
        raise ConfigError(f"{args.config} is a Data-Juicer recipe, not a course config: pass it with --recipe")
    return load_config(args.config, profile=args.profile, workdir=args.workdir)


def _tiny_kolors(args: argparse.Namespace) -> int:
    """`--size full` writes a real-size random Kolors in the download's layout, else the tiny one (default
    folder: the config's tiny models folder, with its seed, which the tiny profile then finds)."""
    if args.toy:
        return _toy_kolors(args)
    if args.size == "full":
        from kolors_lib.offline_models.fullsize import write_full_kolors as write_kolors
    else:
        from kolors_lib.offline_models.tiny import write_tiny_kolors as write_kolors

    if args.dir is None and args.size == "full":
        raise ConfigError("tiny-kolors --size full needs DIR: where to write the ~17 GB of random weights")
    cfg = _config(args) if args.dir is None else None
    folder = args.dir if cfg is None else cfg.tiny_models_dir  # where the tiny profile looks
    seed = checked_seed(args.seed, "--seed") if args.seed is not None else (0 if cfg is None else cfg.seed)
    out = write_kolors(folder, seed=seed, overwrite=args.overwrite)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    return 0


def _toy_kolors(args: argparse.Namespace) -> int:
    """`tiny-kolors --toy [DIR]`: train the toy Kolors (once per machine) into DIR, or the toy profile's folder."""
    from kolors_lib.kolors.models import load_model_manager
    from kolors_lib.offline_models.toy import toy_models, write_toy_kolors

    if args.size == "full":
        raise ConfigError("tiny-kolors: --toy and --size full exclude each other (the toy model is tiny)")
    if args.dir is not None:
        seed = args.seed if args.seed is not None else 0
        out = write_toy_kolors(args.dir, load_model_manager, seed=seed, overwrite=args.overwrite)
    else:
        cfg = _config(args)
        out = toy_models(cfg.toy_models_dir, load_model_manager, seed=cfg.seed if args.seed is None else args.seed)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the device plan for a described card (--gpu-memory) or this machine; loads no weights, no torch."""
    from dataclasses import replace

    from kolors_lib.core.device_plan import Hardware, device_plan

    if args.gpu_memory is not None:
        hw = Hardware.card(args.gpu_memory, bf16=not args.no_bf16)
        profile = "full" if args.profile == "auto" else args.profile  # a described GPU means the real model
    else:
        hw = Hardware.detect()
        hw = replace(hw, bf16=hw.bf16 and not args.no_bf16)
        profile = args.profile
    plan = device_plan(load_config(args.config, profile=profile, workdir=args.workdir), hw)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def _models(args: argparse.Namespace) -> int:
    from kolors_lib.kolors.models import DOWNLOADED, download_plan, resolve_model

    cfg = _config(args)
    if args.dry_run:
        print("\n".join(download_plan(cfg, DOWNLOADED)))
        return 0
    print(json.dumps({k: str(resolve_model(cfg, k)) for k in DOWNLOADED}, indent=2))
    return 0


def _data(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.data_command == "import":
        from kolors_lib.data.importer import import_dataset

        result = import_dataset(cfg, args.src)
        print(f"imported {result.count} images into {result.raw_dir} ({len(result.skipped)} skipped)")
        for row in result.skipped:
            print(f"  skipped {row['source']}: {row['reason']}")
        return 0
    from kolors_lib.clean.pipeline import filter_dataset

    result = filter_dataset(cfg, recipe=args.recipe, executor=args.executor)
    print(f"kept {result.kept} images in {result.train_dir}; report: {result.report_path}")
    for op in result.ops:
        print(f"  {op['op']}: removed {op['removed']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    settings = {"steps": args.steps, "rank": args.rank, "alpha": args.alpha, "lr": args.lr,
                "batch_size": args.batch_size, "grad_accum": args.grad_accum, "precision": args.precision,
                "resolution": args.resolution, "seed": args.seed, "save_every": args.save_every}
    # what train_lora checks first (settings, another train running, step 02's data), before Lightning loads
    training_overrides(cfg, settings)
    with step_lock(cfg.workdir, "train"):
        train_metadata(cfg.train_dir)
    from kolors_lib.train.training import train_lora

    options = {k: getattr(args, k) for k in TRAIN_OPTIONS}  # step 03's "going further" flags
    result = train_lora(cfg, resume=not args.no_resume, **settings, **options)
    last = result.losses[-1][1] if result.losses else float("nan")
    print(f"{result} (final loss {last:.4f}, {result.seconds:.1f} s)\nloss log: {result.loss_csv}")
    return 0


def _storyboard(args: argparse.Namespace) -> int:
    cfg = _config(args)
    load_story(args.story or cfg.generate.story, count_notice=False)  # as the step checks them: story, then LoRA,
    lora_file(args.lora, cfg)  # before torch and DiffSynth load (seconds)
    from kolors_lib.storyboard.storyboard import render_storyboard, strength_sweep

    result = render_storyboard(cfg, args.story, args.strength, args.lora, candidates=args.candidates)
    print(f"storyboard: {result.grid}")
    print(f"manifest: {result.manifest}")
    if args.sweep:
        print(f"sweep: {strength_sweep(cfg, 0, story_path=args.story, lora_path=args.lora)}")
    return 0


def _render(args: argparse.Namespace) -> int:
    if args.name is not None:
        output_name(args.name, "--name")  # where anything is read or written
    cfg = _config(args)
    lora_file(args.lora, cfg)  # before torch and DiffSynth load (seconds)
    from kolors_lib.storyboard.storyboard import render

    result = render(cfg, args.prompt, args.strength, args.seed, lora_path=args.lora, steps=args.steps,
                    name=args.name)
    print(f"rendered {len(result.files)} image(s) into {result.folder}\ngrid: {result.grid}")
    return 0


def _story(args: argparse.Namespace) -> int:
    """`story draft`: 0 when a story file was written (from the LLM or the template rules)."""
    from kolors_lib.storyboard.drafting import (
        DEFAULT_BASE_URL,
        DEFAULT_KEY_ENV,
        DEFAULT_MODEL,
        DEFAULT_TIMEOUT,
        draft_story,
    )

    timeout = DEFAULT_TIMEOUT if args.timeout is None else finite(args.timeout, "--timeout", positive=True)
    result = draft_story(args.scenes, args.out, args.base_url or DEFAULT_BASE_URL, args.model or DEFAULT_MODEL,
                         args.api_key_env or DEFAULT_KEY_ENV, timeout, args.force)
    if result.note:
        print(f"note: {result.note}; wrote a story composed from the template's rules instead", file=sys.stderr)
    print(f"story: {result.path} ({'drafted by the LLM' if result.source == 'llm' else 'from the template rules'})")
    return 0


def _score(args: argparse.Namespace) -> int:
    """Exit 0 on PASS and on FAIL (a low score is a result, printed clearly), 1 on FAIL with --strict."""
    from kolors_lib.score.scoring import score_folder

    result = score_folder(_config(args), args.dir, device=args.device, gate=args.gate, out=args.out)
    print(result)
    print(f"report: {result.csv_path} and {result.json_path}")
    return 1 if args.strict and not result.passed else 0


def _publish(args: argparse.Namespace) -> int:
    """Without --dry-run the token must be in $MODELSCOPE_API_TOKEN (never an argument)."""
    from kolors_lib.publishing.publish import TOKEN_ENV, TOKEN_PAGE, publish, validate_repo_id

    repo_id = validate_repo_id(args.repo_id)
    if not args.dry_run and not os.environ.get(TOKEN_ENV, "").strip():
        raise PublishError(f"no token: uploading needs the environment variable {TOKEN_ENV} (an access token "
                           f"with write permission from {TOKEN_PAGE}, e.g. export {TOKEN_ENV}=...); add "
                           "--dry-run to only see what would be uploaded")
    print(publish(_config(args), repo_id, dry_run=args.dry_run, private=args.private))
    return 0


def _export(args: argparse.Namespace) -> int:
    """IN defaults to the work dir's trained LoRA, OUT to the work dir's lora/ folder."""
    cfg = _config(args) if args.src is None or args.dest is None else None
    src = args.src if args.src is not None else lora_file(None, cfg)
    dest = args.dest
    if dest is None:
        dest = cfg.lora_dir
        dest.mkdir(parents=True, exist_ok=True)  # a folder: the export is named after IN inside it
    from kolors_lib.kolors.lora import export_lora

    print(export_lora(src, args.fmt, dest, alpha=args.alpha))
    return 0


COMMANDS = {"tiny-kolors": _tiny_kolors, "plan": _plan, "models": _models, "data": _data, "train": _train,
            "storyboard": _storyboard, "render": _render, "story": _story, "score": _score, "publish": _publish,
            "export-lora": _export}


def main(argv: Sequence[str] | None = None) -> int:
    """The one dispatcher: run one command; a CourseError or an OS error (full disk, read-only work dir)
    ends with one line `error: ...` and exit code 2."""
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: every step writes through staged folders and atomic files
        print(f"interrupted: {args.command} stopped; its previous outputs are kept as they were", file=sys.stderr)
        return 130
    except CourseError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        raise  # a missing input is a CourseError naming the step that makes it; anything else is a bug
    except OSError as err:  # full disk, read-only work dir, permissions: what and where, not a traceback
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
