"""Issue 24: the 23 hostile inputs on the newer commands that failed, each reproduced (CLI on `tiny`, or
the top-level `kolors_lib` names), plus the five that had not been tried."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kolors_lib

ROOT = Path(__file__).resolve().parents[1]
SCENES = "\n".join(f"场景{i}：少女在院子里散步" for i in range(1, 9)) + "\n"


def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m kolors_lib ARGS` in a fresh process (this worktree's package first, no API key)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MODELSCOPE_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "kolors_lib", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **{"timeout": 600, **kwargs})


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error: ...` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error")] == lines[-1:], lines  # notices may come first
    return lines[-1]


def _kohya_lora(workdir: Path, dest: Path) -> Path:
    """A rank-4 kohya-named LoRA on every to_q of the tiny UNet in `workdir` (any tool could have written it)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    unet, = (workdir / "models/tiny/Kolors/unet").glob("*.safetensors")
    gen, tensors = torch.Generator().manual_seed(0), {}
    with safe_open(str(unet), "pt") as f:
        for key in f.keys():
            if key.endswith(".to_q.weight"):
                out, inp = f.get_slice(key).get_shape()
                name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
                tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=gen) * 0.1
                tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=gen) * 0.1
                tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(dest))
    return dest


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny work dir two levels down (so `../..` stays in the test's folder) with the tiny models, the
    sample images imported and filtered (step 02's training set), and a LoRA file."""
    base = tmp_path_factory.mktemp("hostile2")
    wd = base / "a" / "b" / "work"
    for step in (("tiny-kolors",), ("data", "import"), ("data", "filter")):
        proc = _cli(*step, "--profile", "tiny", "--workdir", str(wd))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "workdir": wd, "lora": _kohya_lora(wd, base / "style.safetensors")}


def _tiny(work: dict[str, Path], *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return _cli(*args, "--profile", "tiny", "--workdir", str(work["workdir"]), **kwargs)


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


# ---------------------------------------------------------------- 1: output names are one path component


@pytest.mark.parametrize("name", ["../../elsewhere/x", "ABSOLUTE", "../storyboard", "..", "a/../b", "."])
def test_render_name_must_be_one_path_component(work: dict[str, Path], name: str) -> None:
    if name == "ABSOLUTE":
        name = str(work["base"] / "abs" / "x")
    before = _files_under(work["base"])
    proc = _tiny(work, "render", "a cat", "--lora", str(work["lora"]), "--name", name)
    line = _one_error_line(proc)
    assert "--name" in line and "one folder name" in line, line
    assert _files_under(work["base"]) == before  # nothing written anywhere


# ---------------------------------------------------------------- 3: YAML bombs, duplicate keys, long values

# under 300 bytes, 9**9 (387 million) leaves when expanded: each list holds the previous one 9 times
BOMB = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "]"


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a bomb must not take the shared machine


@pytest.mark.parametrize("where", ["seed", "action", "config"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, where: str) -> None:
    story = (ROOT / "configs/story.yaml").read_text(encoding="utf-8")
    if where == "seed":
        text = story.replace("    seed: 1\n", f"    seed: {BOMB}\n", 1)
    elif where == "action":
        text = story.replace("    action: 一个{少女}，坐在古代书院的教室里，认真听讲，盯着老师手中的竹简\n",
                             f"    action: {BOMB}\n", 1)
    else:
        text = f"seed: {BOMB}\n"
    assert text != story
    path = tmp_path / ("my.yaml" if where == "config" else "story.yaml")
    path.write_text(text, encoding="utf-8")
    args = ["--config", str(path)] if where == "config" else ["--story", str(path)]
    start = time.monotonic()
    proc = _cli("storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"), *args,
                timeout=60, preexec_fn=_limit_memory)
    line = _one_error_line(proc)
    assert time.monotonic() - start < 30
    assert "alias" in line and str(path) in line, line
    assert len(line) < 400 + len(str(path))


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    story = tmp_path / "dup.yaml"
    story.write_text("title: t\nscenes:\n  - {prompt: a cat, seed: 1}\nscenes:\n  - {prompt: a dog, seed: 2}\n",
                     encoding="utf-8")
    line = _one_error_line(_cli("storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"),
                                "--story", str(story)))
    assert "duplicate key 'scenes'" in line and str(story) in line and "line 4" in line, line
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  steps: 5\ntrain:\n  rank: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"my\.yaml.*duplicate key 'train'"):
        kolors_lib.load_config(config, profile="tiny")


def test_error_messages_quote_a_long_value_short(tmp_path: Path) -> None:
    story = tmp_path / "long.yaml"
    story.write_text("scenes:\n  - prompt: a cat\n    seed: [" + ", ".join(["12345678"] * 2000) + "]\n",
                     encoding="utf-8")
    line = _one_error_line(_cli("storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"),
                                "--story", str(story)))
    assert "seed must be an integer in [0, 2**63)" in line and len(line) < 300 + len(str(story)), line


# ---------------------------------------------------------------- 4: an interrupted storyboard


def _board(folder: Path) -> dict[str, Any]:
    """The manifest of a storyboard folder, after checking that every panel file matches it."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    panels = sorted(p.name for p in folder.glob("panel_*.png"))
    assert panels == [p["file"] for p in manifest["panels"]]
    for p in manifest["panels"]:
        assert hashlib.sha256((folder / p["file"]).read_bytes()).hexdigest() == p["sha256"], p["file"]
    return manifest


def _new_panel_since(workdir: Path, start: float) -> bool:
    """True once a panel_01.png written after `start` is in the storyboard or a staged folder beside it."""
    for folder in [workdir / "storyboard", *workdir.glob(".storyboard.*")]:
        try:
            if (folder / "panel_01.png").stat().st_mtime > start:
                return True
        except FileNotFoundError:  # not written yet, or renamed while we looked
            continue
    return False


def _interrupted_rerun(work: dict[str, Path], story: Path, sig: int) -> tuple[int, str]:
    """Re-render the storyboard at another strength and send `sig` once its first panel is on disk."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "kolors_lib", "storyboard", "--profile", "tiny", "--workdir",
                             str(work["workdir"]), "--lora", str(work["lora"]), "--strength", "0.5", "--story",
                             str(story)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not _new_panel_since(work["workdir"], start):
            assert proc.poll() is None and time.monotonic() < deadline, "the re-run ended before its first panel"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_interrupted_storyboard_keeps_a_whole_board_and_score_checks_it(work: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    board = work["workdir"] / "storyboard"
    story = tmp_path / "story.yaml"
    story.write_text("title: t\nscenes:\n" + "".join(f"  - {{prompt: a cat {i}, seed: {i}}}\n" for i in range(1, 9)),
                     encoding="utf-8")
    first = _tiny(work, "storyboard", "--lora", str(work["lora"]), "--story", str(story))
    assert first.returncode == 0, first.stderr[-3000:]
    old = _board(board)

    code, err = _interrupted_rerun(work, story, signal.SIGINT)  # Ctrl-C
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and err.replace("\r", "\n").strip().splitlines()[-1].startswith("interrupted"), err
    assert _board(board) == old  # the old board, whole (the new one never finished)
    assert not [p for p in board.parent.iterdir() if p.name.startswith(".storyboard.")]  # no staged leftovers

    code, err = _interrupted_rerun(work, story, signal.SIGKILL)  # kill -9: no handler runs at all
    assert code == -signal.SIGKILL
    assert _board(board) == old

    (board / "panel_02.png").write_bytes((board / "panel_01.png").read_bytes())
    line = _one_error_line(_tiny(work, "score"))
    assert "panel_02.png" in line and "manifest" in line, line


# ---------------------------------------------------------------- 5: config precedence and checks


def test_a_user_file_beats_the_profile_and_overrides_beat_the_file(tmp_path: Path) -> None:
    """Every top-level key and every section, including each key the tiny profile sets."""
    user = {"seed": 7, "resolution": 768, "device": "cuda:1", "workdir": str(tmp_path / "mine"),
            "models": {"kolors": {"local_dir": str(tmp_path / "K")}, "aesthetic": {"model_id": "me/pred"}},
            "data": {"source": str(tmp_path / "imgs"), "limit": 5},
            "filter": {"aesthetic_min_score": 3.0, "caption_max_new_tokens": 9, "caption_max_pixels": 999},
            "lora": {"rank": 8}, "train": {"steps": 7, "precision": "bf16-mixed", "save_every": 3,
                                           "validate_every": 2, "validation_prompts": ["x"]},
            "generate": {"steps": 6, "width": 192, "height": 256}, "score": {"gate": 5.5}}
    path = tmp_path / "my.yaml"
    path.write_text(json.dumps(user), encoding="utf-8")  # JSON is YAML
    cfg = kolors_lib.load_config(path, profile="tiny")
    got = cfg.to_dict()
    for key, value in user.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                want = v if not isinstance(v, dict) else {**got[key][sub], **v}
                assert got[key][sub] == want, (key, sub)
        else:
            assert got[key] == value, key
    assert kolors_lib.load_config(path, profile="full").resolution == 768
    over = kolors_lib.load_config(path, profile="tiny", overrides={"resolution": 512, "train.steps": 2})
    assert (over.resolution, over.train.steps, over.train.save_every) == (512, 2, 3)


@pytest.mark.parametrize(("text", "match"), [
    ("train:\n  steps: ten\n", r"my\.yaml: train\.steps must be an integer >= 1, not 'ten'"),
    ("resolution: 63\n", r"my\.yaml: resolution must be a multiple of 64"),
    ("filter:\n  aesthetic_min_score: .nan\n", r"my\.yaml: filter\.aesthetic_min_score must be a finite number"),
    ("train:\n  ema_decay: 1.5\n", r"my\.yaml: train\.ema_decay must be a number in \[0, 1\), not 1\.5"),
    ("train:\n  augment_variants: -3\n", r"my\.yaml: train\.augment_variants must be an integer >= 0, not -3"),
    ("filter:\n  trigger_word: 'kstory, ink'\n", r"my\.yaml: filter\.trigger_word .*one tag.*'kstory, ink'"),
    ("filter:\n  trigger_word: \"kstory\\nink\"\n", r"my\.yaml: filter\.trigger_word .*one tag"),
    ("seed: 18446744073709551616\n", r"my\.yaml: seed must be an integer in \[0, 2\*\*63\)"),
    # untried before: a validation split of every image, 1000 cached variants of every image
    ("train:\n  val_fraction: 1.0\n", r"my\.yaml: train\.val_fraction must be a number in \[0, 1\), not 1\.0"),
    ("train:\n  augment_variants: 1000\n", r"my\.yaml: train\.augment_variants must be at most 100"),
])
def test_a_user_files_values_are_checked_naming_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "my.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        kolors_lib.load_config(path, profile="tiny")


def test_user_file_steps_reach_training(work: dict[str, Path], tmp_path: Path) -> None:
    """`train.steps: ten` used to be dropped for the profile's 30 steps (exit 0)."""
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  steps: ten\n", encoding="utf-8")
    line = _one_error_line(_tiny(work, "train", "--config", str(path)))
    assert "train.steps must be an integer >= 1, not 'ten'" in line and str(path) in line


# ---------------------------------------------------------------- 6, 7: numbers range-checked where read


@pytest.mark.parametrize(("args", "match"), [
    (["--steps", "-3"], "steps must be an integer >= 1, not -3"),
    (["--steps", "0"], "steps must be an integer >= 1, not 0"),
    (["--seed", "18446744073709551616"], "seed must be an integer in [0, 2**63), not 18446744073709551616"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**63), not -1"),
])
def test_render_numbers_are_checked_before_any_model_loads(work: dict[str, Path], args: list[str],
                                                           match: str) -> None:
    before = _files_under(work["workdir"] / "renders")
    proc = _tiny(work, "render", "a cat", "--lora", str(work["lora"]), *args, timeout=120)
    assert match in _one_error_line(proc)
    assert _files_under(work["workdir"] / "renders") == before


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_story_draft_timeout_must_be_positive_and_finite(tmp_path: Path, value: str) -> None:
    scenes = tmp_path / "scenes.txt"
    scenes.write_text(SCENES, encoding="utf-8")
    start = time.monotonic()
    line = _one_error_line(_cli("story", "draft", str(scenes), "--timeout", value, timeout=60))
    assert f"--timeout must be a finite number > 0, not {float(value)!r}" in line, line
    assert time.monotonic() - start < 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes.txt"]


@pytest.mark.parametrize(("args", "match"), [
    (["--ema-decay", "1.5"], r"train.ema_decay must be a number in [0, 1), not 1.5"),
    (["--augment-variants", "-3"], "train.augment_variants must be an integer >= 0, not -3"),
    (["--target-modules", "nonsense"], "lora.target_modules: nonsense matches no layer of the UNet"),
    (["--seed", "-1"], r"seed must be an integer in [0, 2**63), not -1"),
])
def test_train_options_are_checked_before_training(work: dict[str, Path], args: list[str], match: str) -> None:
    line = _one_error_line(_tiny(work, "train", "--steps", "1", *args))
    assert match in line, line
    if "target" in match:
        assert "attn, attn_ff, all_linear" in line, line
    assert not (work["workdir"] / "lora" / "kolors_lora.safetensors").exists()


def test_score_skips_images_too_small_for_the_predictor(work: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "panel_01.png")
    Image.new("RGB", (1, 1), (0, 0, 0)).save(folder / "a_tiny.png")  # first in its batch: a traceback once
    Image.new("RGB", (1, 300), (0, 0, 0)).save(folder / "sliver.png")
    proc = _tiny(work, "score", str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "pics-scores/scores.json").read_text(encoding="utf-8"))
    reasons = {r["file"]: r["reason"] for r in report["unreadable"]}
    assert set(reasons) == {"a_tiny.png", "sliver.png"} and "too small" in reasons["a_tiny.png"], reasons
    assert report["mean_over"]["panels"] == 1 and math.isfinite(report["mean"])
    line = _one_error_line(_tiny(work, "score", str(folder), "--gate", "nan"))
    assert "gate must be a finite number, not nan" in line, line


# ---------------------------------------------------------------- untried before: odd work dirs, repo ids


def test_work_dir_inside_the_source_or_at_a_file_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(src / "a.png")
    inside = _one_error_line(_cli("data", "import", str(src), "--profile", "tiny", "--workdir", str(src / "w")))
    assert "overlaps the output folder" in inside, inside
    (tmp_path / "file").write_text("x")
    at_file = _one_error_line(_cli("data", "import", str(src), "--profile", "tiny", "--workdir",
                                   str(tmp_path / "file")))
    assert "is a file" in at_file and str(tmp_path / "file") in at_file, at_file
    assert not (src / "w" / "data").exists()  # nothing imported (the work dir asked for holds only logs/)


@pytest.mark.parametrize("repo_id", ["me/..", "../x", "/abs/x", "me/a/../b", "me/."])
def test_repo_ids_are_owner_and_one_name(tmp_path: Path, repo_id: str) -> None:
    line = _one_error_line(_cli("publish", "--repo-id", repo_id, "--dry-run", "--profile", "tiny", "--workdir",
                                str(tmp_path / "w")))
    assert "is not OWNER/NAME" in line, line
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- 2: a failed step keeps the previous output (last: it
# used to delete the training set the module's other tests use)


def test_failed_filter_keeps_the_previous_training_set(work: dict[str, Path], tmp_path: Path) -> None:
    train = work["workdir"] / "data/clean/train"
    before = {n: (train / n).read_bytes() for n in _files_under(train)}
    report = (work["workdir"] / "data/clean/report.json").read_bytes()
    assert len(before) > 2
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("process:\n  - image_shape_filter:\n      min_width: 100000\n", encoding="utf-8")
    proc = _tiny(work, "data", "filter", "--recipe", str(recipe))
    line = _one_error_line(proc)
    assert "nothing left after filtering" in line and "kept as it was" in line, line
    assert {n: (train / n).read_bytes() for n in _files_under(train)} == before
    assert (work["workdir"] / "data/clean/report.json").read_bytes() == report  # the pair stays a pair
    failed = json.loads((work["workdir"] / "data/clean/report.failed.json").read_text(encoding="utf-8"))
    assert failed["kept"] == 0
