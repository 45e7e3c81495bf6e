"""Set-up on a notebook image (00_setup.ipynb + scripts/setup_env.py): find the repo, the GPU, what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import setup_env  # noqa: E402


def _find_repo_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "00_setup.ipynb").read_text(encoding="utf-8"))
    (cell,) = [c for c in nb["cells"] if "find-repo" in c["metadata"].get("tags", [])]
    return "".join(cell["source"])


def _run_cell(cwd: Path, path_dirs: str | None = None) -> subprocess.CompletedProcess:
    """Run the notebook's first cell as a kernel would, started in `cwd`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path_dirs is not None:
        env["PATH"] = path_dirs
    return subprocess.run([sys.executable, "-c", _find_repo_cell()], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_notebook_finds_the_repository_from_where_the_kernel_starts(tmp_path: Path) -> None:
    # opened from the repository: the kernel starts in notebooks/
    out = _run_cell(ROOT / "notebooks", path_dirs=str(tmp_path))  # no nvidia-smi on this PATH
    assert out.returncode == 0, out.stderr
    assert f"course repository: {ROOT}\n" in out.stdout
    assert "no NVIDIA GPU" in out.stdout and "'tiny' profile" in out.stdout
    # Colab / ModelScope: the kernel starts in /content or /mnt/workspace, the clone is a folder inside it
    clone = tmp_path / "content" / "kolors-course"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.py", clone / "scripts")
    out = _run_cell(clone.parent)
    assert out.returncode == 0, out.stderr
    assert f"course repository: {clone}\n" in out.stdout
    # nothing there: a clear message on how to get it, not "can't open file ../scripts/setup_env.py"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _run_cell(empty)
    assert out.returncode != 0
    assert "git clone" in out.stderr and "Traceback" not in out.stderr


def test_gpu_check_names_the_gpu_nvidia_smi_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup_env.check_gpu() is False
    assert "no NVIDIA GPU" in capsys.readouterr().out
    smi = tmp_path / "nvidia-smi"  # the driver's tool, as it answers this query
    smi.write_text("#!/bin/sh\necho 'Tesla T4, 15360 MiB'\n", encoding="utf-8")
    smi.chmod(0o755)
    assert setup_env.check_gpu() is True
    assert capsys.readouterr().out == "GPU: Tesla T4, 15360 MiB\n"


def test_changes_list_what_the_install_replaced() -> None:
    now = setup_env.installed(sys.executable)
    assert now["pytest"] and now["transformers"]
    # the image before the install: newer transformers/huggingface_hub, no diffsynth, one package since removed
    image = {k: v for k, v in now.items() if k != "diffsynth"}
    image |= {"transformers": "5.24.0", "huggingface-hub": "1.4.0", "an-old-package": "0.1"}
    text = setup_env.changes(image, now)
    lines = text.splitlines()
    assert lines[0] == "Replaced in this Python (2 packages, version before -> now):"
    assert any(line.split() == ["transformers", "5.24.0", "->", now["transformers"]] for line in lines)
    assert any(line.split() == ["huggingface-hub", "1.4.0", "->", now["huggingface-hub"]] for line in lines)
    assert f"Added (1): diffsynth {now['diffsynth']}" in lines
    assert "Removed (1): an-old-package 0.1" in lines
    assert setup_env.changes(now, now).startswith("Nothing that was installed before was replaced.")


def test_streamed_commands_show_their_output_as_it_comes(capsys) -> None:
    setup_env.run([sys.executable, "-c", "import sys; print('Collecting diffsynth'); print('oops', file=sys.stderr)"],
                  stream=True)
    out = capsys.readouterr().out
    assert "Collecting diffsynth\n" in out and "oops\n" in out
    with pytest.raises(subprocess.CalledProcessError):
        setup_env.run([sys.executable, "-c", "raise SystemExit(3)"], stream=True)
