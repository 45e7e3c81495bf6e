"""The config object: profiles, path rules, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kolors_lib.core import config as config_mod
from kolors_lib.core.config import DEFAULT_CONFIG, load_config
from kolors_lib.core.errors import ConfigError
from kolors_lib.core.settings import ModelsConfig, ModelSource


def test_tiny_profile_puts_everything_under_the_workdir(tmp_path: Path) -> None:
    cfg = load_config(profile="tiny", workdir=tmp_path / "w")
    assert cfg.profile == "tiny" and cfg.device == "cpu" and cfg.resolution == 128
    assert cfg.workdir == (tmp_path / "w").resolve()
    for path in (cfg.raw_dir, cfg.train_dir, cfg.models.kolors.local_dir, cfg.models.aesthetic.local_dir):
        assert path.is_relative_to(cfg.workdir)
    assert cfg.train_dir == cfg.clean_dir / "train"
    assert cfg.data.source == "sample"


def test_full_profile_uses_modelscope_ids(tmp_path: Path) -> None:
    cfg = load_config(profile="full", workdir=tmp_path)
    assert (cfg.device, cfg.resolution) == ("cuda", 1024)
    assert cfg.models.kolors.model_id == "Kwai-Kolors/Kolors" and cfg.models.kolors.local_dir is None
    assert cfg.models.vae_fp16_fix.model_id == "AI-ModelScope/sdxl-vae-fp16-fix"
    assert cfg.data.dataset_id == "AI-ModelScope/lowres_anime" and cfg.data.source == "modelscope"
    assert cfg.filter.recipe == DEFAULT_CONFIG.parent / "data_juicer.yaml"


def test_default_workdir_is_the_repo_workdir() -> None:
    assert load_config(profile="tiny").workdir == DEFAULT_CONFIG.parent.parent / "workdir"


def test_toy_profile_draws_its_own_world_under_the_workdir(tmp_path: Path) -> None:
    cfg = load_config(profile="toy", workdir=tmp_path / "w")
    assert (cfg.profile, cfg.device, cfg.resolution) == ("toy", "cpu", 64)
    assert cfg.models.kolors.local_dir == cfg.toy_models_dir / "Kolors"
    assert cfg.data.source == "toy" and cfg.generate.story == DEFAULT_CONFIG.parent / "toy_story.yaml"


def test_auto_falls_back_to_toy_with_a_one_line_notice(monkeypatch: pytest.MonkeyPatch, capsys,
                                                        tmp_path: Path) -> None:
    monkeypatch.setattr(config_mod, "cuda_available", lambda: False)
    cfg = load_config(profile="auto", workdir=tmp_path / "w")
    assert cfg.profile == "toy" and cfg.data.source == "toy"
    err = capsys.readouterr().err
    assert err.startswith("NOTICE: ") and err.count("\n") == 1 and "'toy' profile" in err, err
    assert not (tmp_path / "w").exists()  # resolving the profile trains nothing: the toy is made on first use
    monkeypatch.setattr(config_mod, "cuda_available", lambda: True)
    assert load_config(profile="auto", workdir=tmp_path / "w").profile == "full"
    assert capsys.readouterr().err == ""


def test_user_config_only_overrides_what_it_sets(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "workdir: runs/a\nfilter:\n  trigger_word: 水墨\n  recipe: my_recipe.yaml\n"
        "models:\n  kolors:\n    local_dir: ../weights/Kolors\n", encoding="utf-8")
    cfg = load_config(tmp_path / "mine.yaml", profile="full")
    assert cfg.workdir == tmp_path / "runs" / "a"
    assert cfg.filter.trigger_word == "水墨"
    assert cfg.filter.recipe == tmp_path / "my_recipe.yaml"
    assert cfg.models.kolors.local_dir == (tmp_path / "../weights/Kolors").resolve()
    assert cfg.data.default_caption == "二次元"  # inherited from configs/default.yaml


def test_overrides_and_plain_dict(tmp_path: Path) -> None:
    cfg = load_config(profile="tiny", workdir=tmp_path, overrides={"seed": 7, "data": {"limit": 3}})
    assert cfg.seed == 7 and cfg.data.limit == 3
    plain = cfg.to_dict()
    assert plain["workdir"] == str(tmp_path.resolve()) and plain["data"]["limit"] == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [("seeed: 1\n", "unknown key(s) seeed"),
     ("data:\n  sorce: x\n", "data: unknown key(s) sorce"),
     ("models:\n  unet: {}\n", "unknown key(s) under models: unet"),
     ("filter:\n  executor: spark\n", "filter.executor"),
     ("- a\n- b\n", "expected a mapping"),
     ("a: [\n", "not valid YAML")],
)
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        load_config(path, profile="tiny")
    assert message in str(err.value)


def test_unknown_profile_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'gpu'"):
        load_config(profile="gpu")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", profile="tiny")


def test_one_override_route_nested_and_dotted(tmp_path: Path) -> None:
    nested = load_config(profile="tiny", workdir=tmp_path, overrides={"train": {"steps": 5}, "lora": {"rank": 8}})
    dotted = load_config(profile="tiny", workdir=tmp_path, overrides={"train.steps": 5, "lora.rank": 8})
    assert (nested.train.steps, nested.lora.rank) == (dotted.train.steps, dotted.lora.rank) == (5, 8)
    assert dotted.train.precision == nested.train.precision == "32"  # the rest of the section kept


def test_override_errors_name_the_override_not_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.stepz': no such setting") as err:
        load_config(profile="tiny", workdir=tmp_path, overrides={"train.stepz": 5})
    assert "default.yaml" not in str(err.value) and "steps" in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'colour'"):
        load_config(profile="tiny", workdir=tmp_path, overrides={"colour": "red"})


def test_apply_overrides_uses_the_same_route(tmp_path: Path) -> None:
    from kolors_lib.core.config import apply_overrides

    cfg = load_config(profile="tiny", workdir=tmp_path)
    changed = apply_overrides(cfg, {"train.steps": 3, "lora": {"alpha": 2.0}, "seed": None})
    assert (changed.train.steps, changed.lora.alpha, changed.seed) == (3, 2.0, cfg.seed)
    assert cfg.train.steps != 3  # a copy: the loaded config is unchanged
    with pytest.raises(ConfigError, match=r"override 'lora\.alfa'"):
        apply_overrides(cfg, {"lora.alfa": 1})


def test_every_setting_has_its_default_in_default_yaml() -> None:
    import dataclasses

    import yaml

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    missing = [f"{name}.{f.name}" for name, cls in config_mod._SECTIONS.items() if name != "models"
               for f in dataclasses.fields(cls) if f.name not in (raw.get(name) or {})]
    assert missing == []


SETTINGS_CLASSES = (config_mod.Config, ModelsConfig, ModelSource,
                    *(cls for cls in config_mod._SECTIONS.values()))


def test_defaults_live_only_in_default_yaml() -> None:
    """No config dataclass carries a default of its own: configs/default.yaml is the one place."""
    import dataclasses

    with_default = [f"{cls.__name__}.{f.name}" for cls in SETTINGS_CLASSES for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


def test_default_yaml_names_every_top_level_setting_and_model() -> None:
    import dataclasses

    import yaml

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    loader_set = {"profile", "source_file"}  # not settings: the loader fills them in
    top = [f.name for f in dataclasses.fields(config_mod.Config)
           if f.name not in loader_set | set(config_mod._SECTIONS)]
    assert [name for name in top if name not in raw] == []
    models = [f.name for f in dataclasses.fields(ModelsConfig)]
    assert [name for name in models if name not in raw["models"]] == []
    source_keys = {f.name for f in dataclasses.fields(ModelSource)}
    assert {k: set(v) for k, v in raw["models"].items() if k != "cache_dir" and set(v) != source_keys} == {}


def test_a_user_config_that_omits_sections_gets_default_yaml_values(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed: 3\ntrain:\n  steps: 7\n", encoding="utf-8")
    cfg = load_config(mine, profile="full", workdir=tmp_path).to_dict()
    default = load_config(profile="full", workdir=tmp_path).to_dict()
    assert (cfg.pop("seed"), cfg["train"].pop("steps")) == (3, 7)
    default.pop("seed"), default["train"].pop("steps"), cfg.pop("source_file"), default.pop("source_file")
    assert cfg == default


def test_a_config_that_does_not_inherit_must_name_every_setting(tmp_path: Path) -> None:
    here = DEFAULT_CONFIG.parent
    text = (DEFAULT_CONFIG.read_text(encoding="utf-8").replace("story: story.yaml", f"story: {here}/story.yaml")
            .replace("recipe: data_juicer.yaml", f"recipe: {here}/data_juicer.yaml"))
    assert "score:\n  gate: 6.0\n" in text
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherit: false\n" + text.replace("score:\n  gate: 6.0\n", "score: {}\n"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*score: missing key\(s\) gate"):
        load_config(mine, profile="full", workdir=tmp_path)
    mine.write_text("inherit: false\n" + text.replace("gate: 6.0", "gate: 5.5"), encoding="utf-8")
    assert load_config(mine, profile="full", workdir=tmp_path).score.gate == 5.5
