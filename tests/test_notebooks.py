"""The notebooks as a learner runs them: papermill, in order, on one work dir, tiny profile, offline."""

from __future__ import annotations

import csv
import json
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
def test_course_notebooks_run_in_sequence(tmp_path: Path) -> None:
    workdir = tmp_path / "course"
    done = notebooks.run("tiny", workdir, only=None)
    assert [p.name[:2] for p in done][:2] == ["01", "02"]

    raw = [json.loads(line) for line in (workdir / "data/raw/metadata.jsonl").read_text().splitlines()]
    report = json.loads((workdir / "data/clean/report.json").read_text())
    with open(workdir / "data/clean/train/metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert report["input"] == len(raw) > 0
    assert 0 < report["kept"] == len(rows) < len(raw)
    assert all((workdir / "data/clean/train" / r["file_name"]).is_file() for r in rows)
    assert all(r["text"].startswith("kstory") for r in rows)
    # every filter had something to remove in the sample set
    assert all(op["removed"] > 0 for op in report["ops"]), report["ops"]

    # the executed notebooks show pictures, not just text
    executed = json.loads((workdir / "notebooks/02_clean_with_data_juicer.ipynb").read_text())
    images = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
