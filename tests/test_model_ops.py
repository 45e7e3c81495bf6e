"""Step 02's model ops: the challenge's aesthetic scale and threshold, optional filters that never download."""

from __future__ import annotations

import json
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kolors_lib.clean.model_ops import CANONICAL_AESTHETIC, DJ_AESTHETIC_SCALE, prepare_model_ops
from kolors_lib.clean.pipeline import filter_dataset
from kolors_lib.core.config import Config
from kolors_lib.core.errors import FilterError
from kolors_lib.score.scoring import load_predictor


def write_raw(raw_dir: Path, n: int, captions: dict[int, str] | None = None, size: int = 1024) -> list[str]:
    """`n` distinct noisy images that pass the recipe's size filters, in step 01's layout; returns ids."""
    (raw_dir / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        blocks = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size))
        noise = rng.integers(-24, 24, (size, size, 3))
        im = Image.fromarray(np.clip(np.asarray(blocks, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        im.save(raw_dir / "images" / f"{i:05d}.jpg", quality=85)
        text = (captions or {}).get(i, f"caption {i}")
        rows.append({"id": f"{i:05d}", "images": [f"images/{i:05d}.jpg"], "text": text, "source": f"s{i}"})
    (raw_dir / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
    return [r["id"] for r in rows]


def our_scores(folder: Path, raw_dir: Path, ids: list[str]) -> dict[str, float]:
    """Scores of the raw images by step 05's predictor code (the challenge's 0-10 scale)."""
    import torch

    model, processor = load_predictor(folder)
    images = [Image.open(raw_dir / "images" / f"{i}.jpg").convert("RGB") for i in ids]
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits[:, 0]
    return dict(zip(ids, map(float, logits), strict=True))


class ConnectionCounter:
    """A loopback TCP listener that counts the connections made to it (any would be a download attempt)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.count += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_step02_models: dict[str, Path]) -> dict[str, Any]:
    """One run: the predictor in a renamed folder, a threshold between the scores, hubs on a counting port."""
    from kolors_lib.core.config import load_config

    root = tmp_path_factory.mktemp("model-ops")
    renamed = root / "my-scorer"  # neither "v2", "linear" nor "aesthetics-predictor" in the path
    shutil.copytree(tiny_step02_models["aesthetic"], renamed)
    cfg = load_config(profile="tiny", workdir=root / "workdir", overrides={
        "models": {"aesthetic": {"local_dir": str(renamed)}, "captioner": {"local_dir": str(root / "absent")}},
        "filter": {"caption_mode": "keep"}})
    ids = write_raw(cfg.raw_dir, 4)
    ours = our_scores(renamed, cfg.raw_dir, ids)
    ranked = sorted(ids, key=ours.__getitem__)
    # halfway between the 2nd and 3rd score: the two lowest must go
    cfg.filter.aesthetic_min_score = (ours[ranked[1]] + ours[ranked[2]]) / 2
    hub = ConnectionCounter()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MODELSCOPE_ENDPOINT", "HF_ENDPOINT"):
            mp.setenv(var, hub.url)
        result = filter_dataset(cfg)
    hub.close()
    return {"cfg": cfg, "result": result, "ours": ours, "low": ranked[:2], "connections": hub.count,
            "renamed": renamed}


def test_data_juicer_alone_cannot_use_a_renamed_predictor_folder(run: dict[str, Any]) -> None:
    """The trap the canonical link avoids: Data-Juicer picks the class from the folder's name."""
    from kolors_lib.core.compat import patch_torchvision

    patch_torchvision()
    from data_juicer.utils.model_utils import prepare_simple_aesthetics_model

    with pytest.raises(ValueError, match="Not support"):
        prepare_simple_aesthetics_model(str(run["renamed"]))


def test_scores_are_on_the_challenge_scale_for_a_renamed_folder(run: dict[str, Any]) -> None:
    images = {row["id"]: row for row in run["result"].images}
    for item_id, score in run["ours"].items():
        # Data-Juicer's score x DJ_AESTHETIC_SCALE == step 05's score of the same image
        assert images[item_id]["aesthetic"] == pytest.approx(score, abs=1e-4)
    recipe = (run["cfg"].clean_dir / "dj" / "recipe.yaml").read_text(encoding="utf-8")
    assert f"models/{CANONICAL_AESTHETIC}" in recipe
    assert f"min_score: {run['cfg'].filter.aesthetic_min_score / DJ_AESTHETIC_SCALE}" in recipe


def test_threshold_removes_the_low_scoring_images(run: dict[str, Any]) -> None:
    result = run["result"]
    removed = {r["id"]: r for r in result.removed}
    assert sorted(removed) == sorted(run["low"])
    for item_id, row in removed.items():
        assert row["op"] == "image_aesthetics_filter"
        assert row["value"] == f"score {run['ours'][item_id]:.2f}"
        assert row["aesthetic"] == pytest.approx(run["ours"][item_id], abs=1e-4)
    assert result.kept == 2
    assert [o["op"] for o in result.ops] == ["image_shape_filter", "image_aspect_ratio_filter",
                                             "image_size_filter", "image_deduplicator", "image_aesthetics_filter"]
    table = result.images_table()
    assert list(table["status"]) == ["removed" if i in removed else "kept" for i in sorted(run["ours"])]


def test_optional_filters_off_without_models_and_nothing_downloaded(run: dict[str, Any], capfd) -> None:
    report = json.loads(run["result"].report_path.read_text(encoding="utf-8"))
    assert [n.split(" ")[0] for n in report["notices"]] == ["image_watermark_filter", "image_nsfw_filter"]
    assert all("models." in n and "local_dir" in n for n in report["notices"])
    assert run["connections"] == 0


def test_optional_filter_notice_is_one_line_on_stderr(step02_cfg: Config, tmp_path: Path, capsys) -> None:
    process = [{"image_watermark_filter": {"prob_threshold": 0.8}}]
    ops = prepare_model_ops(step02_cfg, process, tmp_path, Path("recipe.yaml"))
    assert ops.process == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("NOTICE: image_watermark_filter skipped")


def test_recipe_may_not_set_what_the_config_owns(step02_cfg: Config, tmp_path: Path) -> None:
    process = [{"image_aesthetics_filter": {"min_score": 0.5}}]
    with pytest.raises(FilterError, match=r"recipe\.yaml: image_aesthetics_filter\.min_score .*course config"):
        prepare_model_ops(step02_cfg, process, tmp_path, Path("recipe.yaml"))


def test_an_op_that_fails_stops_the_step_naming_the_op(tiny_step02_models: dict[str, Path], tmp_path: Path) -> None:
    """A predictor folder without its tokenizer: Data-Juicer would log the error and drop every image,
    and the report would blame the deduplicator; the step must stop and name the failing op."""
    from kolors_lib.core.config import load_config

    broken = tmp_path / "predictor"
    shutil.copytree(tiny_step02_models["aesthetic"], broken)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    cfg = load_config(profile="tiny", workdir=tmp_path / "workdir", overrides={
        "models": {"aesthetic": {"local_dir": str(broken)}, "captioner": {"local_dir": str(tmp_path / "absent")}},
        "filter": {"caption_mode": "keep"}})
    write_raw(cfg.raw_dir, 3)
    with pytest.raises(FilterError, match=r"image_aesthetics_filter failed.*KeyError") as err:
        filter_dataset(cfg)
    assert "deduplicator" not in str(err.value)
    assert not (cfg.train_dir / "metadata.csv").exists()
