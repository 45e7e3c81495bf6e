"""`make gpu-check` runs without CUDA: the tiny Kolors, every phase measured beside the plan's estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~1-2 min on a quiet 2-core machine: 4 tiny trainings, a panel, ChatGLM twice
def test_gpu_check_runs_every_phase_on_the_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--size", "tiny", "--resolution", "64",
                           "--workdir", str(tmp_path / "w"), "--out", str(out), "--deadline-s", "100000"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["steps"] == 1 and report["size"] == "tiny"
    names = [p["phase"] for p in report["phases"]]
    assert names == ["build models", "cache 16-mixed", "cache bf16-mixed",
                     "train 16-mixed base none", "train 16-mixed base int8",
                     "train bf16-mixed base none", "train bf16-mixed base int8",
                     "storyboard panel", "chatglm x8 float16", "chatglm x8 int8"]
    for phase in report["phases"][1:]:
        assert phase["measured_gib"] >= 0 and phase["estimate_gib"] > 0 and phase["seconds"] > 0, phase
        assert all(row["dtype"] and row["device"] == "cpu" for row in phase["plan_rows"]), phase
        assert f"{phase['phase']:<28} measured" in proc.stdout
    rows = {p["phase"]: p["plan_rows"] for p in report["phases"][1:]}
    assert [r["dtype"] for r in rows["train bf16-mixed base int8"] if r["model"] == "unet"] == ["int8"]
    assert [r["dtype"] for r in rows["train bf16-mixed base none"] if r["model"] == "unet"] == ["bfloat16"]
    assert [r["dtype"] for r in rows["chatglm x8 int8"]] == ["int8"]
    # each training run wrote its LoRA, and the panel used the last one
    assert (tmp_path / "w" / "lora" / "kolors_lora.safetensors").is_file()
    assert list((tmp_path / "w").glob("**/gpu-check/*.png"))
