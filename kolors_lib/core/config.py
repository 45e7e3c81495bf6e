"""One configuration object for every step: YAML files in configs/, profiles, paths."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.checks import check_config
from kolors_lib.core.errors import ConfigError
from kolors_lib.core.settings import (
    DataConfig,
    FilterConfig,
    GenerateConfig,
    LoraConfig,
    ModelsConfig,
    ModelSource,
    ScoreConfig,
    TrainConfig,
)
from kolors_lib.core.yaml_files import quote, read_yaml_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
PROFILES = ("full", "tiny", "toy", "auto")
LORA_FORMATS = ("diffsynth", "diffusers", "kohya")  # the LoRA namings export-lora writes
NAME_HINT = "队伍名称-可图Kolors训练-xxx"  # the challenge's model-name style
# file names every step agrees on (read them through the Config properties below)
LORA_FILE = "kolors_lora.safetensors"
MANIFEST_FILE = "manifest.json"
GRID_FILE = "storyboard.png"
SCORES_CSV, SCORES_JSON = "scores.csv", "scores.json"
N_PANELS = 8
MODEL_KEYS = ("kolors", "vae_fp16_fix", "aesthetic", "captioner", "watermark", "nsfw")
CAPTION_MODES = ("keep", "fill", "replace")


def panel_file(number: int) -> str:
    """File name of panel `number` (1-based): panel_01.png ... panel_08.png."""
    return f"panel_{number:02d}.png"


@dataclass
class Config:
    """Everything a step needs; every output path derives from `workdir`.

    The dataclasses here carry no defaults: every setting's default is in configs/default.yaml, which
    a user's config file is layered over (load_config).
    """

    profile: str
    workdir: Path
    models: ModelsConfig
    data: DataConfig
    filter: FilterConfig
    lora: LoraConfig
    train: TrainConfig
    generate: GenerateConfig
    score: ScoreConfig
    seed: int
    resolution: int
    device: str
    source_file: Path | None  # the config file it was loaded from (set by the loader, not a setting)

    @property
    def raw_dir(self) -> Path:
        """Step 01 output: imported images and metadata.jsonl."""
        return self.workdir / "data" / "raw"

    @property
    def clean_dir(self) -> Path:
        """Step 02 output: DiffSynth dataset root (train/metadata.csv) and the report."""
        return self.workdir / "data" / "clean"

    @property
    def train_dir(self) -> Path:
        """The kept images and metadata.csv, in DiffSynth's training layout."""
        return self.clean_dir / "train"

    @property
    def lora_dir(self) -> Path:
        """Step 03 output: caches, checkpoints, the trained LoRA and its exports."""
        return self.workdir / "lora"

    @property
    def storyboard_dir(self) -> Path:
        """Step 04 output: panels, the storyboard grid, the manifest."""
        return self.workdir / "storyboard"

    @property
    def scores_dir(self) -> Path:
        """Step 05 output: the score report."""
        return self.workdir / "scores"

    @property
    def publish_dir(self) -> Path:
        """Step 06 output: the folder that is uploaded to ModelScope."""
        return self.workdir / "publish"

    @property
    def lora_path(self) -> Path:
        """The trained LoRA that step 03 writes and steps 04-06 read."""
        return self.lora_dir / LORA_FILE

    @property
    def loss_csv(self) -> Path:
        """The training loss log (step,loss)."""
        return self.lora_dir / "loss.csv"

    @property
    def val_loss_csv(self) -> Path:
        """The validation loss log (step,val_loss), written when a validation split is set."""
        return self.lora_dir / "val_loss.csv"

    @property
    def manifest_path(self) -> Path:
        """Step 04's manifest: everything needed to re-render a panel."""
        return self.storyboard_dir / MANIFEST_FILE

    @property
    def grid_path(self) -> Path:
        """Step 04's captioned grid of the panels."""
        return self.storyboard_dir / GRID_FILE

    def panel_paths_for(self, count: int) -> list[Path]:
        """The panel files of a story of `count` scenes, in story order."""
        return [self.storyboard_dir / panel_file(i) for i in range(1, count + 1)]

    @property
    def renders_dir(self) -> Path:
        """`render`'s output: one folder per prompt with its images, grid and render.json."""
        return self.workdir / "renders"

    @property
    def scores_json(self) -> Path:
        """Step 05's report."""
        return self.scores_dir / SCORES_JSON

    @property
    def prompt_cache_dir(self) -> Path:
        """ChatGLM encodings of story prompts (steps 04-06), so a re-render needs no ChatGLM."""
        return self.workdir / "cache" / "prompts"

    @property
    def logs_dir(self) -> Path:
        """Each step's log of the libraries it used (warnings, logging, prints): logs/NN_step.log."""
        return self.workdir / "logs"

    @property
    def models_dir(self) -> Path:
        """Downloaded or generated model files."""
        return self.workdir / "models"

    @property
    def tiny_models_dir(self) -> Path:
        """Where the tiny profile writes its random-weight models."""
        return self.models_dir / "tiny"

    @property
    def toy_models_dir(self) -> Path:
        """Where the toy profile copies its trained models (kept once per machine: offline_models.toy)."""
        return self.models_dir / "toy"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (paths as strings) for reports and manifests."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `over` merged in, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cuda_available() -> bool:
    """True when torch sees a CUDA device (False when torch is missing)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_profile(profile: str) -> str:
    """Map `auto` to `full` on a CUDA machine, else to `toy` with a visible notice."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if profile != "auto":
        return profile
    if cuda_available():
        return "full"
    print("NOTICE: profile 'auto': no CUDA GPU found, using the 'toy' profile (a small Kolors trained on a toy "
          "world of coloured shapes, on CPU; trained once per machine)", file=sys.stderr)
    return "toy"


def _build(cls: type, data: Any, where: str) -> Any:
    """`cls(**data)`, with an error naming `where` for a non-mapping, unknown keys or missing keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = [name for name in names if name not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)} ({DEFAULT_CONFIG} has every setting; "
                          "a config file with `inherit: false` must name them all)")
    return cls(**data)


def default_setting(*keys: str) -> Any:
    """One setting's value in configs/default.yaml (relative paths made absolute), e.g. ("filter", "recipe")."""
    node: Any = read_yaml(DEFAULT_CONFIG)
    for key in keys:
        node = node[key]
    return node


def default_train(**changes: Any) -> TrainConfig:
    """Step 03's settings as configs/default.yaml has them (the camp's run), with `changes`."""
    return TrainConfig(**{**default_setting("train"), **changes})


def _path(value: Any, base: Path, workdir: Path | None = None) -> Path | None:
    if value in (None, ""):
        return None
    text = str(value)
    if workdir is not None:
        text = text.replace("{workdir}", str(workdir))
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path).resolve()


_PATH_KEYS = (("workdir",), ("filter", "recipe"), ("generate", "story"), ("data", "source"), ("models", "cache_dir"),
              ("models", "kolors", "local_dir"), ("models", "vae_fp16_fix", "local_dir"),
              ("models", "aesthetic", "local_dir"), ("models", "captioner", "local_dir"),
              ("models", "watermark", "local_dir"), ("models", "nsfw", "local_dir"))


def _absolutize(data: dict[str, Any], base: Path) -> None:
    """Make the relative paths of one file absolute, so merging files keeps their meaning."""
    for section in (data, *((data.get("profiles") or {}).values())):
        for keys in _PATH_KEYS:
            node = section
            for key in keys[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict) or not isinstance(node.get(keys[-1]), str):
                continue
            value = node[keys[-1]]
            if value in ("modelscope", "sample", "toy") or "{workdir}" in value:
                continue
            node[keys[-1]] = str(_path(value, base))


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping (relative paths made absolute), with an error that names the file."""
    data = read_yaml_file(path, "config", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _absolutize(data, Path(path).resolve().parent)
    return data


def _layers(data: dict[str, Any], profile: str, path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    """One file's layers for `profile` (its base values, then its `profiles.<profile>`) and its profile names."""
    profiles = data.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: 'profiles' must be a mapping of profile name -> settings")
    return [data, profiles.get(profile) or {}], set(profiles)


_SECTIONS = {"models": ModelsConfig, "data": DataConfig, "filter": FilterConfig, "lora": LoraConfig,
             "train": TrainConfig, "generate": GenerateConfig, "score": ScoreConfig}


def nest_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Overrides as a nested dict; dotted keys ("train.steps": 5) and nested dicts both work.

    Unknown names raise a ConfigError that names the override (not a config file).
    """
    nested: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    for name, value in nested.items():
        section = _SECTIONS.get(name)
        if section is None and name not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"override {name!r}: no such setting (known: {', '.join(_override_names())})")
        if section is not None and section is not ModelsConfig:
            if not isinstance(value, dict):
                raise ConfigError(f"override {name!r}: expected a mapping of {name}.* settings")
            known = {f.name for f in dataclasses.fields(section)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"override '{name}.{unknown[0]}': no such setting (known under {name}: "
                                  f"{', '.join(sorted(known))})")
    return nested


def apply_overrides(cfg: Config, overrides: dict[str, Any] | None) -> Config:
    """A copy of a loaded `cfg` with overrides, by the same rules as load_config (None values are skipped)."""
    cfg = copy.deepcopy(cfg)
    _set_fields(cfg, nest_overrides({k: v for k, v in (overrides or {}).items() if v is not None}))
    return check_config(cfg)


def _set_fields(obj: Any, values: dict[str, Any]) -> None:
    """Set dataclass fields from a nested dict, recursing into nested dataclasses (sections, models)."""
    for name, value in values.items():
        current = getattr(obj, name)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            _set_fields(current, value)
        else:
            setattr(obj, name, value)


def _override_names() -> list[str]:
    plain = [f.name for f in dataclasses.fields(Config) if f.name not in _SECTIONS
             and f.name not in ("profile", "source_file")]
    return sorted(plain + [f"{s}.*" for s in _SECTIONS])


def load_config(
    path: str | Path | None = None,
    profile: str = "auto",
    workdir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Load `path` (default configs/default.yaml) for a profile, then `overrides` (see nest_overrides).

    Precedence, lowest first: default.yaml, its `profiles.<profile>`, the user's file `path` (then its own
    `profiles.<profile>`, if it has one), `overrides` (the CLI flags). `inherit: false` in a user file
    leaves default.yaml out. The merged result is checked (check_config); errors name `path` and the key.

    The one override route: every setting can be changed by a nested dict ({"train": {"steps": 5}}) or a
    dotted key ({"train.steps": 5}); a wrong name fails with an error naming the override.
    """
    overrides = nest_overrides(overrides)
    path = Path(path) if path else DEFAULT_CONFIG
    user = read_yaml(path)
    name = resolve_profile(profile)
    layers, defined = _layers(user, name, path)
    # a user's config file only needs the keys it changes: it is layered over default.yaml and its profile
    if user.pop("inherit", True) and path.resolve() != DEFAULT_CONFIG.resolve():
        base, names = _layers(read_yaml(DEFAULT_CONFIG), name, DEFAULT_CONFIG)
        layers, defined = base + layers, defined | names
    if name not in defined and name != "full":
        raise ConfigError(f"{path}: profile {name!r} is not defined under 'profiles'")
    merged: dict[str, Any] = {}
    for layer in (*layers, overrides):  # default.yaml < its profile < the user's file (< its profile) < overrides
        merged = deep_merge(merged, layer)
    return _from_dict(merged, name, path.resolve().parent, workdir, path)


def _from_dict(
    data: dict[str, Any], profile: str, base: Path, workdir: str | Path | None, source: Path
) -> Config:
    where = str(source)
    data = dict(data)
    default_wd = data.pop("workdir", None) or "workdir"
    wd = Path(workdir).expanduser().resolve() if workdir else _path(default_wd, base)
    if wd.exists() and not wd.is_dir():
        raise ConfigError(f"the work dir {wd} is a file: give a folder (it is created when missing)")
    models_raw = dict(data.pop("models", {}) or {})
    cache = _path(models_raw.pop("cache_dir", None), base, wd)
    sources = {}
    for key in MODEL_KEYS:
        src = _build(ModelSource, models_raw.pop(key, None) or {}, f"{where}: models.{key}")
        src.local_dir = _path(src.local_dir, base, wd)
        sources[key] = src
    if models_raw:
        raise ConfigError(f"{where}: unknown key(s) under models: {', '.join(sorted(models_raw))}")
    data_cfg = _build(DataConfig, data.pop("data", {}) or {}, f"{where}: data")
    if data_cfg.source not in ("modelscope", "sample", "toy"):
        data_cfg.source = str(_path(data_cfg.source, base, wd))
    filt = _build(FilterConfig, data.pop("filter", {}) or {}, f"{where}: filter")
    filt.recipe = _path(filt.recipe, base, wd) or Path(default_setting("filter", "recipe"))
    if filt.executor not in ("default", "ray"):
        raise ConfigError(f"{where}: filter.executor must be 'default' or 'ray', not {quote(filt.executor)}")
    if filt.caption_mode not in CAPTION_MODES:
        raise ConfigError(f"{where}: filter.caption_mode must be one of {', '.join(CAPTION_MODES)}, "
                          f"not {quote(filt.caption_mode)}")
    lora = _build(LoraConfig, data.pop("lora", {}) or {}, f"{where}: lora")
    train = _build(TrainConfig, data.pop("train", {}) or {}, f"{where}: train")
    gen = _build(GenerateConfig, data.pop("generate", {}) or {}, f"{where}: generate")
    gen.story = _path(gen.story, base, wd) or Path(default_setting("generate", "story"))
    score = _build(ScoreConfig, data.pop("score", {}) or {}, f"{where}: score")
    cfg = _build(Config, {**data, "profile": profile, "workdir": wd, "source_file": source.resolve(),
                          "models": ModelsConfig(cache_dir=cache, **sources), "data": data_cfg, "filter": filt,
                          "lora": lora, "train": train, "generate": gen, "score": score}, where)
    try:
        return check_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


__all__ = ["Config", "apply_overrides", "deep_merge", "load_config", "nest_overrides", "panel_file", "read_yaml",
           "resolve_profile"]
