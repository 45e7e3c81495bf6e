"""Issue 10: hostile inputs and faults, each reproduced for real (paths, processes, mounts, files)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kolors_lib.clean.pipeline import filter_dataset
from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import ConfigError
from kolors_lib.core.files import sha256_file
from kolors_lib.train.training import train_lora
from tests import test_training
from tests.test_filtering import SPECS, configure, make_raw
from tests.test_training import FAST, _cfg_in

ROOT = Path(__file__).resolve().parents[1]
base_cfg = test_training.base_cfg  # the tiny models, written once per module


def _cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m kolors_lib ARGS` in a fresh process (this worktree's package first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kolors_lib", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **{"timeout": 600, **kwargs})

# ---------------------------------------------------------------- 1: a space in the work dir


def test_filter_runs_under_a_path_with_a_space(tmp_path: Path) -> None:
    cfg = configure(load_config(profile="tiny", workdir=tmp_path / "My Projects" / "work dir"))
    make_raw(cfg.raw_dir, {k: SPECS[k] for k in ("00001", "00002", "00003")})
    result = filter_dataset(cfg)
    assert result.kept == 2
    assert (cfg.train_dir / "metadata.csv").is_file()
    report = json.loads((cfg.clean_dir / "report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 2


# ---------------------------------------------------------------- 3, 4: training runs


def test_identical_runs_give_identical_lora_bytes_and_a_noop_rerun_keeps_the_file(
        base_cfg: Config, tmp_path: Path) -> None:
    a = train_lora(_cfg_in(base_cfg, tmp_path / "a"), steps=2, **FAST)
    b = train_lora(_cfg_in(base_cfg, tmp_path / "b"), steps=2, **FAST)
    assert sha256_file(a.lora_path) == sha256_file(b.lora_path)
    before = (a.lora_path.stat().st_mtime_ns, sha256_file(a.lora_path))
    again = train_lora(_cfg_in(base_cfg, tmp_path / "a"), steps=2, **FAST)
    assert again.resumed_from == 2
    assert (again.lora_path.stat().st_mtime_ns, sha256_file(again.lora_path)) == before


@pytest.mark.parametrize(("override", "value", "match"), [
    ("steps", 0, r"train\.steps must be an integer >= 1, not 0"),
    ("steps", -3, r"train\.steps must be an integer >= 1, not -3"),
    ("grad_accum", 0, r"train\.grad_accum must be an integer >= 1"),
    ("rank", 0, r"lora\.rank must be an integer >= 1"),
    ("batch_size", 0, r"train\.batch_size must be an integer >= 1"),
    ("resolution", 63, r"resolution must be a multiple of 64"),
    ("lr", float("nan"), r"train\.learning_rate must be a finite number > 0, not nan"),
    ("alpha", float("inf"), r"lora\.alpha must be a finite number > 0"),
])
def test_bad_train_arguments_fail_before_any_work(tiny_cfg: Config, override: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train_lora(tiny_cfg, **{override: value})
    assert not tiny_cfg.lora_dir.exists()


def test_bad_train_argument_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    proc = _cli("train", "--profile", "tiny", "--workdir", str(tmp_path / "w"), "--lr", "nan")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: train.learning_rate must be a finite number > 0, not nan"]


def test_bad_value_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("train:\n  grad_accum: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"my\.yaml: train\.grad_accum must be an integer >= 1, not 0"):
        load_config(config, profile="tiny")


def test_fewer_steps_than_the_checkpoints_hold_trains_anew(base_cfg: Config, tmp_path: Path) -> None:
    fresh = train_lora(_cfg_in(base_cfg, tmp_path / "fresh"), steps=4, **FAST)
    cfg = _cfg_in(base_cfg, tmp_path / "w")
    train_lora(cfg, steps=8, **FAST)
    with pytest.warns(UserWarning, match="past the 4 steps"):
        short = train_lora(cfg, steps=4, **FAST)
    assert short.resumed_from == 0 and [s for s, _ in short.losses] == [1, 2, 3, 4]
    assert sha256_file(short.lora_path) == sha256_file(fresh.lora_path)
    aside = cfg.lora_dir / "checkpoints.set-aside-1"
    assert [p.name for p in sorted(aside.glob("step-*.pt"))] == ["step-0000006.pt", "step-0000008.pt"]


# ---------------------------------------------------------------- 7, 8: odd names and special files


def _png(path: Path, seed: int = 0) -> None:
    from tests.test_filtering import noisy_image

    noisy_image(64, 64, seed).save(path)


def test_import_skips_odd_names_special_files_and_outside_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _png(src / "good.png")
    _png(src / "other.png", 1)
    bad_name = os.path.join(os.fsencode(src), b"\xff\xfe.png")
    with open(bad_name, "wb") as f:
        f.write((src / "other.png").read_bytes())
    os.mkfifo(src / "pipe.png")
    (src / "zero.png").symlink_to("/dev/zero")
    (src / "passwd.png").symlink_to("/etc/passwd")
    (src / "inside.png").symlink_to(src / "good.png")
    work = tmp_path / "w"
    proc = _cli("data", "import", str(src), "--profile", "tiny", "--workdir", str(work), timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "data/raw/import_report.json").read_text(encoding="utf-8"))
    reasons = {row["source"]: row["reason"] for row in report["skipped"]}
    assert report["imported"] == 3  # good, other, and the link that stays inside the folder
    assert "not valid UTF-8" in reasons["\\xff\\xfe.png"]
    assert "not a regular file" in reasons["pipe.png"]
    assert "outside the source folder" in reasons["zero.png"]
    assert "outside the source folder" in reasons["passwd.png"]
    assert sorted(p.name for p in (work / "data").iterdir()) == ["raw"]  # no .raw.tmp-* left behind


# ---------------------------------------------------------------- 2: one writer per step


def test_second_train_in_the_same_work_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    work = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kolors_lib.core.lock import step_lock\n"
         f"with step_lock({str(work)!r}, 'train'):\n    print('ready', flush=True)\n    time.sleep(120)\n",
         "train", "--steps", "8"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        proc = _cli("train", "--profile", "tiny", "--workdir", str(work), "--steps", "2")
        assert proc.returncode == 2
        line, = proc.stderr.strip().splitlines()
        assert line.startswith("error: another train is running in") and f"pid {holder.pid}:" in line
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is stale and the next run takes it over (then fails for lack of data)
    proc = _cli("train", "--profile", "tiny", "--workdir", str(work), "--steps", "2")
    assert proc.returncode == 2 and "another train" not in proc.stderr, proc.stderr
    assert not (work / ".lock-train.holder.json").exists()  # the run that took it over left no record


def test_a_crashed_holders_record_naming_a_live_pid_does_not_block(tmp_path: Path) -> None:
    """After a crash the record may name a PID that the OS has since given to another process: the lock is
    the kernel's, so only a process that really holds it blocks the step."""
    from kolors_lib.core.lock import holder_path, lock_path, step_lock

    work = tmp_path / "w"
    work.mkdir()
    record = holder_path(lock_path(work, "train"))
    record.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "train (crashed)"}))
    with step_lock(work, "train"):
        assert json.loads(record.read_text())["pid"] == os.getpid()  # taken over, and the record says so
    assert not record.exists()


# ---------------------------------------------------------------- 5: full and read-only disks


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 256 KiB tmpfs (needs root), unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_full_or_read_only_work_dir_is_one_line_and_keeps_the_previous_import(
        small_disk: Path, tmp_path: Path) -> None:
    from tests.test_filtering import noisy_image

    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    _png(small / "a.png")
    for i in range(6):
        noisy_image(256, 256, i).save(big / f"{i}.png")
    work = small_disk / "w"
    assert _cli("data", "import", str(small), "--profile", "tiny", "--workdir", str(work)).returncode == 0
    before = _tree(work / "data/raw")

    full = _cli("data", "import", str(big), "--profile", "tiny", "--workdir", str(work))
    assert full.returncode == 2
    line, = full.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: {work}") and "No space left on device" in line, full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in (work / "data").iterdir()) == ["raw"]  # no partial .raw.tmp-* folder
    assert _tree(work / "data/raw") == before

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    ro = _cli("data", "import", str(small), "--profile", "tiny", "--workdir", str(work))
    assert ro.returncode == 2 and "Traceback" not in ro.stderr, ro.stderr
    assert "Read-only file system" in ro.stderr and str(work) in ro.stderr
    assert _tree(work / "data/raw") == before


# ---------------------------------------------------------------- 6, 10: NaN and malformed LoRA files

MODULE = "blocks.7.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def _lora(path: Path, tensors: dict[str, Any] | None = None, **meta: str) -> Path:
    """A one-module DiffSynth LoRA file with the given metadata (raw strings, as any tool could write)."""
    import torch
    from safetensors.torch import save_file

    tensors = tensors or {f"{MODULE}.lora_A.default.weight": torch.randn(4, 64),
                          f"{MODULE}.lora_B.default.weight": torch.randn(64, 4)}
    save_file(tensors, str(path), metadata={"rank": "4", "alpha": "2.0", **meta})
    return path


def _export(capsys: pytest.CaptureFixture[str], src: Path, *extra: str) -> tuple[int, str]:
    from kolors_lib.cli.main import main as cli_main

    code = cli_main(["export-lora", str(src), "--format", "kohya", str(src.with_name("out.safetensors")), *extra])
    return code, capsys.readouterr().err.strip()


def _tensors(a: Any, b: Any, alpha: Any = None) -> dict[str, Any]:
    out = {f"{KOHYA}.lora_down.weight": a, f"{KOHYA}.lora_up.weight": b}
    return out if alpha is None else {**out, f"{KOHYA}.alpha": alpha}


@pytest.mark.parametrize(("case", "match"), [
    ({"alpha": "abc"}, "metadata alpha must be a finite number > 0, not 'abc'"),
    ({"alpha": "nan"}, "metadata alpha must be a finite number > 0, not 'nan'"),
    ({"rank": "x"}, "metadata rank must be a whole number > 0, not 'x'"),
    ({"kolors_lib.json_keys": "[broken"}, "metadata is broken"),
    ("--alpha 0", "--alpha must be a finite number > 0, not 0.0"),
    ("--alpha nan", "--alpha must be a finite number > 0, not nan"),
    ("nan tensors", "NaN or infinite"),
    ("kohya vector alpha", r"alpha must be one number, not a tensor of shape \(2,\)"),
    ("scalar tensor", "not a .*pair of one rank"),
    ("wrong shapes", "not a .*pair of one rank"),
])
def test_malformed_lora_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       case: Any, match: str) -> None:
    import torch

    extra: list[str] = []
    src = tmp_path / "in.safetensors"
    if isinstance(case, dict):
        _lora(src, **case)
    elif case.startswith("--alpha"):
        extra = case.split()
        _lora(src, tensors={f"{KOHYA}.lora_down.weight": torch.randn(4, 64),
                            f"{KOHYA}.lora_up.weight": torch.randn(64, 4)})
    elif case == "nan tensors":
        _lora(src, {f"{MODULE}.lora_A.default.weight": torch.full((4, 64), float("nan")),
                    f"{MODULE}.lora_B.default.weight": torch.randn(64, 4)})
    elif case == "kohya vector alpha":
        _lora(src, _tensors(torch.randn(4, 64), torch.randn(64, 4), torch.tensor([1.0, 2.0])))
    elif case == "scalar tensor":
        _lora(src, _tensors(torch.tensor(1.0), torch.randn(64, 4)))
    else:
        _lora(src, _tensors(torch.randn(4, 64), torch.randn(64, 3)))
    code, err = _export(capsys, src, *extra)
    assert code == 2
    line, = err.splitlines()
    assert line.startswith("error: ") and re.search(match, line), line
    assert not (tmp_path / "out.safetensors").exists()


def test_nan_lora_is_refused_where_step_04_reads_it(tmp_path: Path) -> None:
    import torch

    from kolors_lib.core.errors import LoraFormatError
    from kolors_lib.kolors.lora import read_lora_spec

    src = _lora(tmp_path / "nan.safetensors", {f"{MODULE}.lora_A.default.weight": torch.randn(4, 64),
                                               f"{MODULE}.lora_B.default.weight": torch.full((64, 4), float("inf"))})
    with pytest.raises(LoraFormatError, match=r"nan\.safetensors: .*NaN or infinite"):
        read_lora_spec(src)
    with pytest.raises(LoraFormatError, match="metadata alpha must be a finite number > 0, not 'nan'"):
        read_lora_spec(_lora(tmp_path / "a.safetensors", alpha="nan"))


def test_nan_strength_is_refused_before_any_model_loads(tiny_cfg: Config,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from kolors_lib.kolors.merger import checked_strength
    from kolors_lib.storyboard.storyboard import render_storyboard

    with pytest.raises(ConfigError, match="strength must be a finite number, not nan"):
        render_storyboard(tiny_cfg, strength=float("nan"))
    assert not tiny_cfg.models_dir.exists()
    assert checked_strength(-0.5) == -0.5
    assert "strength -0.5 is negative" in capsys.readouterr().err


def test_json_outputs_refuse_nan(tmp_path: Path) -> None:
    from kolors_lib.core.files import write_json

    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json({"strength": float("nan")}, tmp_path / "manifest.json")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- 12: captions pandas reads as NaN


def test_metadata_csv_captions_round_trip_as_text_through_pandas(tiny_cfg: Config) -> None:
    import pandas as pd

    from kolors_lib.clean.pipeline import RawItem, write_train_dir
    from kolors_lib.core.errors import FilterError

    (tiny_cfg.raw_dir / "images").mkdir(parents=True)
    items = []
    for i, text in enumerate(["NA", "null", "a cat"]):
        path = tiny_cfg.raw_dir / "images" / f"{i}.png"
        _png(path, i)
        items.append(RawItem(id=str(i), image=f"images/{i}.png", path=path, text=text, source=f"s{i}", line=i + 1))
    tiny_cfg.filter.trigger_word = ""
    tiny_cfg.data.default_caption = "二次元"
    write_train_dir(tiny_cfg, items)
    # exactly how DiffSynth 1.1.9's text_to_image dataset reads it
    texts = pd.read_csv(tiny_cfg.train_dir / "metadata.csv")["text"].to_list()
    assert texts == ["二次元", "二次元", "a cat"]
    tiny_cfg.data.default_caption = ""
    with pytest.raises(FilterError, match="image 0: caption 'NA' would be read as missing"):
        write_train_dir(tiny_cfg, items)


# ---------------------------------------------------------------- 11: folders and binary files as inputs


@pytest.mark.parametrize("kind", ["story dir", "config dir", "binary config"])
def test_folder_or_binary_file_as_story_or_config_is_one_line(tmp_path: Path, kind: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kolors_lib.cli.main import main as cli_main

    binary = tmp_path / "x.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    args = {"story dir": ["--story", str(tmp_path)], "config dir": ["--config", str(tmp_path)],
            "binary config": ["--config", str(binary)]}[kind]
    code = cli_main(["storyboard", "--profile", "tiny", "--workdir", str(tmp_path / "w"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    line, = err.splitlines()
    assert line.startswith("error: ") and ("is a folder" in line or "not a text file" in line
                                           or "not valid YAML" in line), line


# ---------------------------------------------------------------- 13: a swap killed between its renames


def test_swap_killed_between_renames_is_recovered_and_leftovers_cleaned(tmp_path: Path) -> None:
    from kolors_lib.train.cache import read_samples

    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    (train / "metadata.csv").write_text("file_name,text\na.png,a cat\n", encoding="utf-8")
    # a real process runs swap_folder's first rename and is killed (SIGKILL) before the second
    code = ("import os, signal\nfrom kolors_lib.core import files\nreal = os.replace\ncalls = []\n"
            "def replace(a, b):\n    real(a, b)\n    calls.append(b)\n"
            "    if len(calls) == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
            "os.replace = replace\n"
            f"with files.staged_folder({str(train)!r}) as tmp:\n    (tmp / 'metadata.csv').write_text('new')\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9
    assert not train.exists()
    names = sorted(p.name for p in train.parent.iterdir())
    assert len(names) == 2 and names[0].startswith(".train.old-") and names[1].startswith(".train.tmp-")
    samples = read_samples(train)  # the next step finds the previous folder again
    assert [s.text for s in samples] == ["a cat"]
    assert sorted(p.name for p in train.parent.iterdir()) == ["train"]


# ---------------------------------------------------------------- 15: cosmetics


def test_import_orientation_bomb_message_and_permissions(tiny_cfg: Config, tmp_path: Path) -> None:
    from PIL import Image

    from kolors_lib.data.importer import import_dataset

    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation: nothing is rotated, so nothing may be reported as rotated
    Image.new("RGB", (64, 32), (10, 20, 30)).save(src / "odd.jpg", exif=exif.tobytes())
    Image.new("RGB", (80, 80), (1, 2, 3)).save(src / "big.png")
    tiny_cfg.data.max_pixels = 3000
    result = import_dataset(tiny_cfg, src)
    assert result.count == 1
    assert not any("rotated" in w.get("message", "") for w in result.warnings)
    (skip,) = result.skipped
    assert skip["source"] == "big.png" and "80x80 = 6400 pixels is above data.max_pixels=3000" in skip["reason"]
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tiny_cfg.raw_dir, tiny_cfg.raw_dir / "metadata.jsonl")}
    assert mode == {"raw": 0o755, "metadata.jsonl": 0o644}  # as mkdir/open give under umask 022


def test_long_caption_warns_that_chatglm_reads_only_256_tokens(base_cfg: Config, tmp_path: Path) -> None:
    from kolors_lib.train.cache import build_cache

    cfg = _cfg_in(base_cfg, tmp_path / "w")
    meta = cfg.train_dir / "metadata.csv"
    long_caption = "kstory, " + ", ".join(f"detail {i}" for i in range(200))
    meta.write_text(meta.read_text(encoding="utf-8").replace("kstory, a blue house", long_caption),
                    encoding="utf-8")
    with pytest.warns(UserWarning, match=r"caption of \d+ tokens is cut to the first 256"):
        build_cache(cfg)


# ---------------------------------------------------------------- 14: generation size bound


@pytest.mark.parametrize("key", ["width", "height"])
def test_generation_size_is_bounded_before_any_model_loads(tiny_cfg: Config, tmp_path: Path, key: str) -> None:
    from kolors_lib.storyboard.storyboard import refine, render_storyboard

    with pytest.raises(ConfigError, match=f"generate.{key} must be a multiple of 64 from 64 to 2048.*99968"):
        load_config(profile="tiny", workdir=tmp_path / "w", overrides={f"generate.{key}": 99968})
    story = tmp_path / "story.yaml"
    text = (ROOT / "configs/story.yaml").read_text(encoding="utf-8")
    story.write_text(f"{key}: 99968\n" + "\n".join(line for line in text.splitlines()
                                                   if not line.startswith(f"{key}:")), encoding="utf-8")
    tiny_cfg.generate.width = tiny_cfg.generate.height = None
    from kolors_lib.core.errors import StoryError

    with pytest.raises(StoryError, match=f"{key} must be a multiple of 64 from 64 to 2048"):
        render_storyboard(tiny_cfg, story)
    _png(tmp_path / "draft.png")
    with pytest.raises(ConfigError, match=f"{key} must be a multiple of 64 from 64 to 2048"):
        refine(tiny_cfg, tmp_path / "draft.png", "a cat", **{key: 99968})
    assert not tiny_cfg.models_dir.exists()
