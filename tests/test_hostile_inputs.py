"""Issue 10: hostile inputs and faults, each reproduced for real (paths, processes, mounts, files)."""

from __future__ import annotations

import json
from pathlib import Path

from kolors_lib.config import load_config
from kolors_lib.filtering import filter_dataset
from tests.test_filtering import SPECS, configure, make_raw

# ---------------------------------------------------------------- 1: a space in the work dir


def test_filter_runs_under_a_path_with_a_space(tmp_path: Path) -> None:
    cfg = configure(load_config(profile="tiny", workdir=tmp_path / "My Projects" / "work dir"))
    make_raw(cfg.raw_dir, {k: SPECS[k] for k in ("00001", "00002", "00003")})
    result = filter_dataset(cfg)
    assert result.kept == 2
    assert (cfg.train_dir / "metadata.csv").is_file()
    report = json.loads((cfg.clean_dir / "report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 2
