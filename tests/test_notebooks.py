"""The notebooks as a learner runs them: papermill, in order, on one work dir, tiny profile, offline."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import notebooks  # noqa: E402


def test_notebooks_are_committed_clean() -> None:
    found = [p for nb in sorted((ROOT / "notebooks").glob("*.ipynb")) for p in notebooks.problems(nb)]
    assert found == []


@pytest.mark.slow
def test_a_run_prints_each_cell_as_it_starts(tmp_path: Path, capfd) -> None:
    import papermill
    from papermill.engines import papermill_engines

    src = tmp_path / "two.ipynb"
    cells = ["# a comment first\nx = 1", "%matplotlib inline\nimport time\ntime.sleep(1.5)"]
    src.write_text(json.dumps({
        "cells": [{"id": f"c{i}", "cell_type": "code", "metadata": {}, "source": c, "outputs": [],
                   "execution_count": None} for i, c in enumerate(cells)] + [
                  {"id": "m", "cell_type": "markdown", "metadata": {}, "source": "## text"}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}), encoding="utf-8")
    papermill_engines.register("test-progress", notebooks.progress_engine("two", 0.0, every=0.5))
    papermill.execute_notebook(str(src), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               engine_name="test-progress", progress_bar=False,
                               extra_arguments=["--IPKernelApp.log_level=ERROR"])
    seen = capfd.readouterr()
    assert "running over TCP" not in seen.err  # the kernel's notice is for servers, not a local run
    lines = [ln for ln in seen.out.splitlines() if ln.strip().startswith("[two ")]
    starts = [ln for ln in lines if not ln.endswith("... still running")]
    assert [ln.split("]")[0].strip() for ln in starts] == ["[two cell 1/2", "[two cell 2/2"]
    assert starts[0].endswith("x = 1") and starts[1].endswith("import time")
    # a long cell says it is still running
    still = [ln for ln in lines if ln.endswith("... still running")]
    assert any(ln.strip().startswith("[two cell 2/2]") for ln in still), lines


LOOK_INSIDE = "## 看一看"  # the heading of each notebook's look-inside section (issue 23)
# pictures each look-inside section draws: 02 removed images; 03 the ‖ΔW‖ chart and the noise grid;
# 04 the emerging picture, the CFG strip and the img2img strip; 05 best and worst panel
LOOK_INSIDE_PICTURES = {"02": 1, "03": 2, "04": 3, "05": 1}


def section_pictures(notebook: dict, heading: str) -> int:
    """PNG outputs of the code cells under the markdown `heading` (up to the next "## " heading)."""
    inside, count = False, 0
    for cell in notebook["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and text.startswith("## "):
            inside = text.startswith(heading)
        elif inside and cell["cell_type"] == "code":
            count += sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))
    return count


def test_section_pictures_counts_only_the_section() -> None:
    def cell(kind: str, text: str, pngs: int = 0) -> dict:
        return {"cell_type": kind, "source": [text], "outputs": [{"data": {"image/png": "x"}}] * pngs}

    nb = {"cells": [cell("code", "a", 1), cell("markdown", LOOK_INSIDE + " / look inside"), cell("code", "b", 2),
                    cell("markdown", "some words"), cell("code", "c", 1), cell("markdown", "## 进阶"),
                    cell("code", "d", 1)]}
    assert section_pictures(nb, LOOK_INSIDE) == 3
    assert section_pictures(nb, "## none") == 0


def test_each_step_notebook_has_a_look_inside_section() -> None:
    for number in LOOK_INSIDE_PICTURES:
        nb = json.loads(next((ROOT / "notebooks").glob(f"{number}_*.ipynb")).read_text(encoding="utf-8"))
        headings = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
        assert sum(h.startswith(LOOK_INSIDE) for h in headings) == 1, number
        code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        assert "assert " in code, f"{number}: the look-inside cells check what they show against the library"


@pytest.mark.slow
def test_course_notebooks_run_in_sequence(tmp_path: Path) -> None:
    workdir = tmp_path / "course"
    done = notebooks.run("tiny", workdir, only=None)
    assert [p.name[:2] for p in done] == ["01", "02", "03", "04", "05", "06"]

    raw = [json.loads(line) for line in (workdir / "data/raw/metadata.jsonl").read_text().splitlines()]
    report = json.loads((workdir / "data/clean/report.json").read_text())
    with open(workdir / "data/clean/train/metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert report["input"] == len(raw) > 0
    assert 0 < report["kept"] == len(rows) < len(raw)
    assert all((workdir / "data/clean/train" / r["file_name"]).is_file() for r in rows)
    assert all(r["text"].startswith("kstory") for r in rows)
    # every size/dedup filter had something to remove in the sample set; on tiny the aesthetic
    # threshold keeps all (random predictor) and the captioner removes nothing
    model_ops = ("image_aesthetics_filter", "kolors_caption_mapper")
    assert all(op["removed"] > 0 for op in report["ops"] if op["op"] not in model_ops), report["ops"]
    assert [op["op"] for op in report["ops"]][-2:] == list(model_ops)
    assert all(row["aesthetic"] is not None for row in report["images"] if row["status"] == "kept")

    # step 03: a LoRA in DiffSynth naming plus its exports, and a loss log
    from safetensors import safe_open

    with safe_open(str(workdir / "lora/kolors_lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in keys)
    assert (meta["rank"], meta["alpha"], meta["trigger_word"]) == ("16", "4.0", "kstory")
    assert (workdir / "lora/kolors_lora.diffusers.safetensors").is_file()
    assert (workdir / "lora/kolors_lora.kohya.safetensors").is_file()
    assert len((workdir / "lora/loss.csv").read_text().splitlines()) == 31

    # step 04: 8 panels + grid + a manifest that names the LoRA we trained; step 05: their scores
    manifest = json.loads((workdir / "storyboard/manifest.json").read_text(encoding="utf-8"))
    assert [p["story_seed"] for p in manifest["panels"]] == list(range(1, 9))
    # notebook 04 ran best-of-2: every final seed is one of its scene's candidates, the story's own first
    for scene, panel in zip(manifest["selection"]["scenes"], manifest["panels"], strict=True):
        seeds = [c["seed"] for c in scene["candidates"]]
        assert len(seeds) == 2 and seeds[0] == panel["story_seed"] and panel["seed"] in seeds
    assert all(p["prompt"].startswith("kstory, 古风") for p in manifest["panels"])
    assert manifest["lora"]["strength"] == 1.0
    assert sorted(f.name for f in (workdir / "storyboard").glob("panel_*.png")) == [
        f"panel_{i:02d}.png" for i in range(1, 9)]
    scores = json.loads((workdir / "scores/scores.json").read_text(encoding="utf-8"))
    assert scores["gate"] == 6.0 and scores["passed"] is False  # random weights score about 0
    assert len([r for r in scores["files"] if r["panel"]]) == 8

    # step 06 (dry run): the upload folder holds the LoRA in 3 namings, a card, samples and prompts
    publish = workdir / "publish"
    names = {p.relative_to(publish).as_posix() for p in publish.rglob("*") if p.is_file()}
    assert {"README.md", "prompts.txt", "manifest.json", "kolors_lora.safetensors", "kolors_lora.diffusers.safetensors",
            "kolors_lora.kohya.safetensors", "samples/storyboard.png"} <= names
    assert len([n for n in names if n.startswith("samples/panel_")]) == 8
    assert "kstory" in (publish / "README.md").read_text(encoding="utf-8")

    # the executed notebooks show pictures, not just text
    executed = json.loads((workdir / "notebooks/02_clean_with_data_juicer.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2

    # each look-inside section (issue 23) ran its asserts and drew its pictures
    for number, pictures in LOOK_INSIDE_PICTURES.items():
        executed = json.loads(next(workdir.glob(f"notebooks/{number}_*.ipynb")).read_text(encoding="utf-8"))
        assert section_pictures(executed, LOOK_INSIDE) == pictures, number

    # ... and results only: the libraries' messages are in each step's log, every bar shows where it ended
    for nb in done:
        outputs = [o for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] for o in c.get("outputs", [])]
        stderr = ["".join(o["text"]) for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr"]
        assert stderr == [], f"{nb.name}: log blocks in the saved notebook: {stderr}"
        text = "\n".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                         for o in outputs)
        for chatter in ("Using sdxl_unet", "GPU available", "torch_dtype", "litlogger", "Data-Juicer", "WARNING"):
            assert chatter not in text, f"{nb.name}: {chatter!r} in the outputs"
        unfinished = [f"{a}/{b}" for a, b in re.findall(r"(\d+)/(\d+) \[", text) if a != b]
        assert unfinished == [], f"{nb.name}: progress bars saved unfinished: {unfinished}"
    logs = workdir / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == [
        "01_import.log", "02_filter.log", "03_train.log", "04_storyboard.log", "05_score.log", "06_publish.log"]
    assert "GPU available" in (logs / "03_train.log").read_text(encoding="utf-8")
    assert "Using sdxl_unet" in (logs / "04_storyboard.log").read_text(encoding="utf-8")

    # 01: skipped files and warnings in one table; 06: the model card with its header as YAML, images embedded
    step01 = json.loads((workdir / "notebooks/01_download_dataset.ipynb").read_text(encoding="utf-8"))
    problems = "".join(step01["cells"][-1]["outputs"][0]["data"]["text/html"])
    assert "skipped" in problems and "warning" in problems and "NaN" not in problems
    step06 = json.loads((workdir / "notebooks/06_publish.ipynb").read_text(encoding="utf-8"))
    card = next("".join(o["data"]["text/markdown"]) for c in step06["cells"] for o in c.get("outputs", [])
                if "text/markdown" in o.get("data", {}))
    assert "```yaml\n" in card and "](samples/" not in card
    assert card.count("](data:image/png;base64,") == 9
