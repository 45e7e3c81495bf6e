"""Argument parsers of every command, free of heavy imports so `--help` and quick commands start at once."""

from __future__ import annotations

import argparse
from pathlib import Path

from kolors_lib.core.config import LORA_FORMATS, NAME_HINT, PROFILES
from kolors_lib.core.settings import LR_SCHEDULERS, OPTIMIZERS, TARGET_PRESETS


def _parser(parser: argparse.ArgumentParser | None, command: str, description: str) -> argparse.ArgumentParser:
    return parser or argparse.ArgumentParser(prog=f"python -m kolors_lib {command}", description=description)


def add_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--workdir, --config and --profile, which every step takes."""
    parser.add_argument("--workdir", type=Path, default=None, help="work dir (default: from the config)")
    parser.add_argument("--config", type=Path, default=None, help="course config YAML (default: configs/default.yaml)")
    parser.add_argument("--profile", choices=PROFILES, default="auto",
                        help="full, toy, tiny or auto (default: full on a CUDA GPU, else toy)")
    return parser


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `train` (step 03)."""
    p = add_common(_parser(parser, "train", "Step 03: train the Kolors LoRA"))
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps in all, a resumed run included (default: train.steps, 500 on full)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: lora.rank, 16)")
    p.add_argument("--alpha", type=float, default=None,
                   help="LoRA alpha; the training scale is alpha/rank, what strength 1.0 means (default: 4)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: train.learning_rate, 1e-4)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--precision", default=None, choices=("32", "16-mixed", "bf16-mixed"))
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--no-resume", action="store_true",
                   help="ignore existing checkpoints and start afresh (they are moved aside, not deleted)")
    g = p.add_argument_group("going further (defaults: the camp's run; see configs/default.yaml)")
    g.add_argument("--target-modules", default=None,
                   help=f"LoRA layers: {' | '.join(TARGET_PRESETS)} or a comma list (e.g. to_q,to_v)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=None)
    g.add_argument("--lr-warmup-steps", type=int, default=None)
    g.add_argument("--val-fraction", type=float, default=None, help="hold out this fraction for a validation loss")
    g.add_argument("--val-files", nargs="+", default=None, help="hold out these file names of metadata.csv")
    g.add_argument("--val-every", type=int, default=None, help="validation loss every N steps")
    g.add_argument("--early-stop-patience", type=int, default=None,
                   help="stop after N validations without improvement")
    g.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting (e.g. 5)")
    g.add_argument("--noise-offset", type=float, default=None, help="noise offset (e.g. 0.05)")
    g.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=None,
                   help="aspect-ratio buckets instead of the 1:1 crop")
    g.add_argument("--augment-variants", type=int, default=None, help="cached crop/colour variants per image")
    g.add_argument("--ema-decay", type=float, default=None, help="EMA of the LoRA weights (e.g. 0.999)")
    return p


# `train` options that go to train_lora under their own name (argparse dest = train_lora keyword)
TRAIN_OPTIONS = ("target_modules", "optimizer", "lr_scheduler", "lr_warmup_steps", "val_fraction", "val_files",
                 "val_every", "early_stop_patience", "min_snr_gamma", "noise_offset", "buckets",
                 "augment_variants", "ema_decay")


def build_export_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `export-lora [IN] --format {diffsynth,diffusers,kohya} [OUT] [--alpha A]` (+ --workdir...)."""
    p = _parser(parser, "export-lora", "Convert a LoRA file to another naming (same strength meaning)")
    p.add_argument("src", type=Path, nargs="?", default=None,
                   help="LoRA .safetensors, any of the three namings (default: step 03's, <workdir>/lora/)")
    p.add_argument("--format", dest="fmt", choices=LORA_FORMATS, required=True, help="naming to write")
    p.add_argument("dest", type=Path, nargs="?", default=None,
                   help="output .safetensors, or a folder to write into (default: <workdir>/lora/)")
    p.add_argument("--alpha", type=float, default=None,
                   help="training LoRA alpha, when a DiffSynth file lacks it in its metadata")
    return add_common(p)


def build_tiny_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `tiny-kolors [DIR] [--seed N] [--size full | --toy]` (+ --workdir...)."""
    p = _parser(parser, "tiny-kolors", "write a tiny random-weight Kolors in the real file layout")
    p.add_argument("dir", type=Path, nargs="?", default=None,
                   help="folder to write (default: where the tiny profile looks, <workdir>/models/tiny)")
    p.add_argument("--seed", type=int, default=None,
                   help="weights seed (default: 0 for DIR; the config's seed, as the tiny profile, without DIR)")
    p.add_argument("--overwrite", action="store_true", help="rewrite even if the same tiny model is there")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny",
                   help="full: real-size random weights in the exact Kwai-Kolors/Kolors layout (~17 GB, fp16)")
    p.add_argument("--toy", action="store_true",
                   help="the toy Kolors: tiny sizes, VAE and UNet trained on a toy world so it draws (once, minutes)")
    return add_common(p)


def build_storyboard_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `storyboard` (step 04)."""
    p = add_common(_parser(parser, "storyboard", "step 04: render the storyboard, a panel per scene"))
    p.add_argument("--story", type=Path, default=None, help="story YAML (default: generate.story)")
    p.add_argument("--strength", type=float, default=None,
                   help="LoRA strength, 1.0 = training scale alpha/rank (default: generate.strength)")
    p.add_argument("--lora", type=Path, default=None,
                   help="LoRA .safetensors (default: <workdir>/lora/kolors_lora.safetensors)")
    p.add_argument("--sweep", action="store_true", help="also render scene 1 at generate.sweep_strengths")
    p.add_argument("--candidates", type=int, default=None,
                   help="best-of-N: draft N seeds per scene, keep the best by score and consistency "
                        "(cost N x scenes x draft steps; default: generate.candidates, 1)")
    return p


def build_render_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `render PROMPT [--strength S ...] [--seed N ...]`: one prompt, with the LoRA."""
    p = add_common(_parser(parser, "render", "render one prompt at one or more LoRA strengths and seeds"))
    p.add_argument("prompt", help="the prompt (the trigger word is put first, as for the storyboard)")
    p.add_argument("--strength", type=float, nargs="+", default=None, metavar="S",
                   help="LoRA strengths, 0 = base model, 1.0 = training scale (default: generate.strength)")
    p.add_argument("--seed", type=int, nargs="+", default=None, metavar="N", help="seeds (default: the config's)")
    p.add_argument("--lora", type=Path, default=None,
                   help="LoRA .safetensors (default: <workdir>/lora/kolors_lora.safetensors)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: as the storyboard)")
    p.add_argument("--name", default=None, help="output folder under <workdir>/renders (default: from the prompt)")
    return p


def build_score_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `score [DIR] [--gate G] [--strict]` (step 05)."""
    p = _parser(parser, "score", "step 05: aesthetic score per panel, the mean vs the gate, style consistency")
    p.add_argument("dir", type=Path, nargs="?", default=None,
                   help="folder of images to score (default: <workdir>/storyboard)")
    add_common(p)
    p.add_argument("--gate", type=float, default=None, help="pass mark for the mean (default: score.gate, 6.0)")
    p.add_argument("--device", default=None, help="torch device (default: the config's, CPU without CUDA)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the mean is below the gate")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: <workdir>/scores for the storyboard, DIR-scores beside another DIR)")
    return p


def build_publish_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `publish --repo-id OWNER/NAME [--dry-run] [--private]` (step 06)."""
    p = _parser(parser, "publish", "step 06: assemble the model page and upload it to ModelScope")
    p.add_argument("--repo-id", required=True, help=f"ModelScope model id OWNER/NAME, e.g. your-user/{NAME_HINT}")
    p.add_argument("--dry-run", action="store_true",
                   help="assemble and list what would be uploaded, upload nothing (no token needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private (default: public)")
    return add_common(p)


def build_story_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of `story draft SCENES.txt [--out FILE] [--base-url URL] [--model NAME] [--api-key-env NAME]`."""
    p = _parser(parser, "story", "story files: draft one from a scene list")
    sub = p.add_subparsers(dest="story_command", required=True)
    draft = sub.add_parser("draft", help="draft the prompts of 8 scenes with an LLM (the camp's template)")
    draft.add_argument("scenes", type=Path, help="text file: 8 scene descriptions, one per line")
    draft.add_argument("--out", type=Path, default=None, help="story file to write (default: SCENES.story.yaml)")
    # defaults (None here) live in kolors_lib.storyboard.drafting, which this light module does not import
    draft.add_argument("--base-url", default=None,
                       help="OpenAI-compatible endpoint (default: ModelScope API-Inference; DashScope works too)")
    draft.add_argument("--model", default=None, help="chat model at that endpoint (default: a Qwen instruct model)")
    draft.add_argument("--api-key-env", default=None,
                       help="environment variable holding the API key (default: MODELSCOPE_API_TOKEN; never printed)")
    draft.add_argument("--timeout", type=float, default=None, help="seconds to wait for the answer (default: 60)")
    draft.add_argument("--force", action="store_true", help="replace an existing story file")
    return p
