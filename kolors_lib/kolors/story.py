"""The story file: scenes (caption, prompt, seed; the challenge asks for 8) plus the settings every panel shares.

`load_story` validates a story YAML before any model loads; `with_trigger` puts the LoRA's trigger
word first, as in the training captions; `render_settings` applies the profile's overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.checks import MAX_SIDE, SIZE_MULTIPLE, image_side, integer
from kolors_lib.core.checks import seed as checked_seed
from kolors_lib.core.config import N_PANELS, Config
from kolors_lib.core.errors import ConfigError, StoryError
from kolors_lib.core.yaml_files import quote, read_yaml_file
from kolors_lib.kolors import prompt_rule

N_SCENES = N_PANELS
STORY_KEYS = ("title", "negative", "cfg_scale", "steps", "width", "height", "scenes", *prompt_rule.STORY_KEYS)
SCENE_KEYS = ("scene", "prompt", "seed", *prompt_rule.SCENE_KEYS)


@dataclass
class Scene:
    """One panel: a caption, the prompt and its seed."""

    scene: str
    prompt: str
    seed: int


@dataclass
class Story:
    """A validated story file: its scenes (any number; the challenge's is 8) plus the settings all panels share."""

    title: str
    negative: str
    cfg_scale: float
    steps: int
    width: int
    height: int
    scenes: list[Scene]
    path: Path | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_story_yaml(path: Path) -> dict[Any, Any]:
    """The story file's top-level mapping; a missing, unreadable or non-mapping file is a StoryError."""
    raw = read_yaml_file(path, "story", StoryError)
    if not isinstance(raw, dict):
        raise StoryError(f"{path}: expected a mapping with a 'scenes' list at the top level")
    return raw


def _story_settings(raw: dict[Any, Any], problems: list[str]) -> dict[str, Any]:
    """negative, cfg_scale, steps, width and height (defaults filled in); what is wrong goes to `problems`."""
    unknown = sorted(set(map(str, raw)) - set(STORY_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(STORY_KEYS)})")
    settings = {"negative": raw.get("negative") or "", "cfg_scale": raw.get("cfg_scale", 4.0),
                "steps": raw.get("steps", 50), "width": raw.get("width", 1024), "height": raw.get("height", 1024)}
    if not isinstance(settings["negative"], str):
        problems.append("'negative' must be a string")
    cfg_scale = settings["cfg_scale"]
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale > 0:
        problems.append(f"cfg_scale must be a positive number, not {quote(cfg_scale)}")
    if not _is_int(settings["steps"]) or settings["steps"] < 1:
        problems.append(f"steps must be a positive integer, not {quote(settings['steps'])}")
    for key in ("width", "height"):
        value = settings[key]
        if not _is_int(value) or value < SIZE_MULTIPLE or value % SIZE_MULTIPLE or value > MAX_SIDE:
            problems.append(f"{key} must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {MAX_SIDE} "
                            f"(Kolors' UNet halves the 8x-downsampled latent 3 times; larger sides need far "
                            f"more memory and time than the course plans for), not {quote(value)}")
    return settings


def _read_scene(number: int, item: Any, problems: list[str]) -> Scene | None:
    """One scene entry as a Scene (None when it is not a mapping); what is wrong goes to `problems`."""
    where = f"scene {number}"
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a mapping with scene, prompt, seed")
        return None
    bad = sorted(set(map(str, item)) - set(SCENE_KEYS))
    if bad:
        problems.append(f"{where}: unknown key(s) {', '.join(bad)} (known: {', '.join(SCENE_KEYS)})")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"{where}: prompt is empty or missing")
    seed = item.get("seed")
    try:
        checked_seed(seed)
    except ConfigError as err:
        problems.append(f"{where}: {err}")
    caption = item.get("scene", "")
    return Scene(str(caption or f"scene {number}"), str(prompt or "").strip(), seed)


def load_story(path: str | Path, count_notice: bool = True) -> Story:
    """Read and validate a story YAML; every problem found is listed in one StoryError.

    Checks: known keys only (top level and per scene), at least one scene, non-empty prompts, integer
    seeds in [0, 2**63), positive integer steps, a positive cfg_scale, width/height multiples of 64.
    A story of other than the challenge's 8 scenes renders too; `count_notice` prints a notice for it.
    """
    path = Path(path)
    raw = _read_story_yaml(path)
    raw, problems = prompt_rule.compose_story(raw)  # scenes given by parts get their prompt by the one rule
    settings = _story_settings(raw, problems)
    scenes_raw = raw.get("scenes")
    if not isinstance(scenes_raw, list):
        problems.append(f"'scenes' must be a list of scenes (scene, prompt, seed; the challenge asks for {N_SCENES})")
        scenes_raw = []
    elif not scenes_raw:
        problems.append(f"'scenes' is empty: give at least one scene (the challenge asks for {N_SCENES})")
    scenes = [scene for number, item in enumerate(scenes_raw, start=1)
              if (scene := _read_scene(number, item, problems)) is not None]
    if problems:
        raise StoryError(f"{path}: " + "; ".join(problems))
    if count_notice and len(scenes) != N_SCENES:
        from kolors_lib.core.console import show  # the learner's console, also inside a step's log

        show(f"NOTICE: {path} has {len(scenes)} scene(s); the challenge's storyboard has {N_SCENES}: "
             "it renders as it is")
    return Story(str(raw.get("title") or path.stem), settings["negative"].strip(), float(settings["cfg_scale"]),
                 settings["steps"], settings["width"], settings["height"], scenes, path.resolve())


def with_trigger(prompt: str, trigger_word: str | None) -> str:
    """`prompt` with the trigger word first (as in the training captions) unless it is already there."""
    trigger = (trigger_word or "").strip()
    if not trigger or trigger in prompt:
        return prompt
    return f"{trigger}, {prompt}"


@dataclass
class RenderSettings:
    """The values every panel of one run shares (story file + the profile's overrides)."""

    negative: str
    cfg_scale: float
    steps: int
    width: int
    height: int


def render_settings(cfg: Config, story: Story) -> RenderSettings:
    """Story values, with cfg.generate.steps/width/height overriding them where set."""
    gen = cfg.generate
    steps = gen.steps or story.steps
    width, height = gen.width or story.width, gen.height or story.height
    for key, value in (("width", width), ("height", height)):
        image_side(value, f"generate.{key}")
    integer(steps, "generate.steps")
    return RenderSettings(story.negative, story.cfg_scale, steps, width, height)


__all__ = ["RenderSettings", "Scene", "Story", "load_story", "render_settings", "with_trigger"]
