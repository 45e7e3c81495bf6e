"""Chinese captions in step 02: the tiny Qwen2-VL, the Data-Juicer op in the recipe, modes, executors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from test_model_ops import write_raw

from kolors_lib.clean.captioning import OP_NAME, KolorsCaptionMapper, load_captioner
from kolors_lib.clean.pipeline import filter_dataset
from kolors_lib.core.compat import OFFLINE_ENV
from kolors_lib.core.config import Config, load_config
from kolors_lib.core.errors import ModelUnavailableError
from kolors_lib.offline_models.tiny_vlm import SPECIAL_TOKENS, write_tiny_vlm

PLACEHOLDER = "二次元"
# image index -> caption in metadata.jsonl: two without one (empty, step 01's placeholder), two with
CAPTIONS = {0: "", 1: PLACEHOLDER, 2: "红发少女, 街道", 3: "a cat"}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_metadata(cfg: Config) -> dict[str, str]:
    with open(cfg.train_dir / "metadata.csv", encoding="utf-8", newline="") as fh:
        return {row["file_name"]: row["text"] for row in csv.DictReader(fh)}


# ---------------------------------------------------------------- in the recipe


def configure(cfg: Config) -> Config:
    cfg.filter.trigger_word = "kstory"
    cfg.filter.remove_tags = ["a cat"]
    return cfg


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, tiny_step02_models: dict[str, Path]) -> dict[str, Any]:
    """The default recipe in `fill` mode (the default) on four images, two of them without a caption."""
    models = {k: {"local_dir": str(v)} for k, v in tiny_step02_models.items()}
    cfg = configure(load_config(profile="tiny", workdir=tmp_path_factory.mktemp("captions") / "workdir",
                                overrides={"models": models}))
    assert cfg.filter.caption_mode == "fill" and cfg.data.default_caption == PLACEHOLDER
    write_raw(cfg.raw_dir, 4, CAPTIONS)
    before = tree_hashes(cfg.raw_dir)
    start = time.perf_counter()
    result = filter_dataset(cfg)
    return {"cfg": cfg, "result": result, "before": before, "seconds": time.perf_counter() - start}


def test_fill_captions_only_the_images_without_one(filled: dict[str, Any]) -> None:
    cfg, result = filled["cfg"], filled["result"]
    captions = read_metadata(cfg)
    assert sorted(captions) == [f"{i:05d}.jpg" for i in range(4)]
    assert captions["00002.jpg"] == "kstory, 红发少女, 街道"
    assert captions["00003.jpg"] == "kstory"  # the only tag was removed: trigger word alone
    for name in ("00000.jpg", "00001.jpg"):
        assert captions[name].startswith("kstory, ")
        assert PLACEHOLDER not in captions[name] and len(captions[name]) > len("kstory, ")
    report = json.loads(result.report_path.read_text(encoding="utf-8"))
    assert report["caption_mode"] == "fill"
    assert report["generated_captions"] == ["00000", "00001"]
    rows = {r["id"]: r for r in report["images"]}
    assert {i: r["caption_source"] for i, r in rows.items()} == {
        "00000": "generated", "00001": "generated", "00002": "original", "00003": "original"}
    assert rows["00000"]["caption"] == captions["00000.jpg"]
    assert all(isinstance(r["aesthetic"], float) for r in rows.values())
    assert OP_NAME in [o["op"] for o in result.ops]
    print(f"captioned run: {filled['seconds']:.1f} s")


def test_source_files_are_never_modified(filled: dict[str, Any]) -> None:
    assert tree_hashes(filled["cfg"].raw_dir) == filled["before"]


def test_images_table_and_grid(filled: dict[str, Any]) -> None:
    from kolors_lib.clean.model_ops import show_captions

    table = filled["result"].images_table()
    assert list(table.columns) == ["id", "image", "status", "op", "aesthetic", "caption", "caption_source"]
    fig = show_captions(filled["result"], cols=2, thumb=64)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 4 and any("generated" in t for t in titles)
    fig.savefig(filled["cfg"].workdir / "captions.png")


def test_keep_mode_leaves_the_op_out_and_uses_the_placeholder(step02_cfg: Config, tmp_path: Path) -> None:
    step02_cfg.filter.caption_mode = "keep"
    step02_cfg.models.captioner.local_dir = tmp_path / "no-such-model"  # never looked at in keep mode
    write_raw(step02_cfg.raw_dir, 2, {0: PLACEHOLDER, 1: "山水"})
    hub_env = {key: os.environ.get(key) for key in OFFLINE_ENV}
    result = filter_dataset(step02_cfg)
    # the offline hub switches were for the Data-Juicer run only (issue 20)
    assert {key: os.environ.get(key) for key in OFFLINE_ENV} == hub_env
    assert OP_NAME not in [o["op"] for o in result.ops]
    assert sorted(read_metadata(step02_cfg).values()) == ["kstory, 二次元", "kstory, 山水"]
    assert [r["caption_source"] for r in result.images] == ["default", "original"]


def test_offline_captioner_fails_fast_naming_the_override(tmp_path: Path, monkeypatch,
                                                          tiny_step02_models: dict[str, Path]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{port}")
    cfg = load_config(profile="full", workdir=tmp_path / "w", overrides={
        "models": {"aesthetic": {"local_dir": str(tiny_step02_models["aesthetic"])}}})
    write_raw(cfg.raw_dir, 1, size=64)
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        filter_dataset(cfg)
    assert time.monotonic() - start < 10
    assert "Qwen/Qwen2-VL-2B-Instruct" in str(err.value) and "models.captioner.local_dir" in str(err.value)


@pytest.mark.slow
def test_ray_executor_captions_the_same(filled: dict[str, Any], tmp_path: Path,
                                        tiny_step02_models: dict[str, Path]) -> None:
    models = {k: {"local_dir": str(v)} for k, v in tiny_step02_models.items()}
    cfg = configure(load_config(profile="tiny", workdir=tmp_path / "workdir", overrides={"models": models}))
    write_raw(cfg.raw_dir, 4, CAPTIONS)
    result = filter_dataset(cfg, executor="ray")
    default = filled["result"]
    assert result.executor == "ray"
    assert read_metadata(cfg) == read_metadata(filled["cfg"])
    assert result.images == default.images
    assert result.ops == default.ops


# ---------------------------------------------------------------- the tiny VLM (last: these run torch in this process)


def test_tiny_vlm_is_deterministic_small_and_in_the_real_layout(tmp_path: Path,
                                                               tiny_step02_models: dict[str, Path]) -> None:
    a = write_tiny_vlm(tmp_path / "a", seed=47)
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "vocab.json",
             "merges.txt", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"}
    assert names <= {p.name for p in a.iterdir()}
    assert tree_hashes(a) == tree_hashes(tiny_step02_models["captioner"])  # same seed, same bytes
    b = write_tiny_vlm(tmp_path / "b", seed=48)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()

    model, processor = load_captioner(a)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in SPECIAL_TOKENS)
    assert tok.decode(tok("一个女孩 a girl")["input_ids"]) == "一个女孩 a girl"  # byte-level BPE round trip


def test_op_modes_fill_and_replace(tiny_step02_models: dict[str, Path], tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (64 + 32 * i, 64), (40 * i, 90, 200)).save(paths[-1])
    samples = {"text": ["", "kept caption", ""], "images": [[p] for p in paths]}
    folder = str(tiny_step02_models["captioner"])
    fill = KolorsCaptionMapper(model_path=folder, mode="fill", max_new_tokens=6, max_pixels=12544)
    out = fill.process_batched({k: list(v) for k, v in samples.items()})
    assert out["text"][1] == "kept caption"
    assert out["text"][0] and out["text"][2] and "\n" not in out["text"][0]
    replace = KolorsCaptionMapper(model_path=folder, mode="replace", max_new_tokens=6, max_pixels=12544)
    again = replace.process_batched({k: list(v) for k, v in samples.items()})
    assert again["text"][1] != "kept caption"
    assert again["text"][0] == out["text"][0]  # greedy: the same image gets the same caption
    with pytest.raises(ValueError, match="mode must be one of"):
        KolorsCaptionMapper(model_path=folder, mode="keep")
