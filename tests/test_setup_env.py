"""Set-up on a notebook image (00_setup.ipynb + scripts/setup_env.py): find the repo, the GPU, what changed."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
import zipfile
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
    assert "no NVIDIA GPU" in out.stdout and "'toy' profile" in out.stdout
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


def write_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel (one module, its METADATA naming its requirements), for a real pip to install."""
    base = name.replace("-", "_")
    info = f"{base}-{version}.dist-info"
    files = {f"{base}.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{base}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, text in files.items():
            zf.writestr(arcname, text)
    return path


def test_changes_list_what_the_install_replaced_added_and_removed() -> None:
    now = setup_env.installed(sys.executable)
    assert now["pytest"] and now["transformers"]
    # the image before the install: newer transformers/huggingface_hub, no diffsynth, kernels (removed on purpose)
    # and a package pip itself replaced away
    image = {k: v for k, v in now.items() if k != "diffsynth"}
    image |= {"transformers": "5.24.0", "huggingface-hub": "1.4.0", "an-old-package": "0.1", "kernels": "0.19.1"}
    text = setup_env.changes(image, now, {"kernels": "needs huggingface-hub>=1.32.0"})
    lines = text.splitlines()
    assert lines[0] == "Replaced in this Python (2 packages, version before -> now):"
    assert any(line.split() == ["transformers", "5.24.0", "->", now["transformers"]] for line in lines)
    assert any(line.split() == ["huggingface-hub", "1.4.0", "->", now["huggingface-hub"]] for line in lines)
    assert f"Added (1): diffsynth {now['diffsynth']}" in lines
    assert "  kernels 0.19.1: needs huggingface-hub>=1.32.0" in lines
    assert "Removed by pip (1): an-old-package 0.1" in lines
    assert setup_env.changes(now, now).startswith("Nothing that was installed before was replaced.")


def test_pip_writes_to_the_log_and_a_failure_is_one_line_naming_pips_error(tmp_path: Path) -> None:
    log = tmp_path / "pip.log"
    with pytest.raises(SystemExit) as failed:
        setup_env.pip(sys.executable, ["install", "--no-index", "no-such-package-kolors"], log)
    message = str(failed.value)
    assert message.startswith("pip failed (exit 1): ERROR: No matching distribution found for no-such-package-kolors")
    assert message.endswith(f"Full log: {log}") and "\n" not in message
    text = log.read_text(encoding="utf-8")
    assert "-m pip install --no-index no-such-package-kolors\n" in text and "ERROR: No matching distribution" in text


def test_one_status_line_counts_the_packages_pip_installs(tmp_path: Path) -> None:
    wheels = [write_wheel(tmp_path / "wheels", "pkg-a", "1.0", ("pkg-b",)),
              write_wheel(tmp_path / "wheels", "pkg-b", "1.0")]
    target, out = tmp_path / "site", io.StringIO()
    tracker, status = setup_env.InstallTracker([target]), setup_env.StatusLine(out)
    args = ["install", "--no-index", "--find-links", str(tmp_path / "wheels"), "--target", str(target), "pkg-a"]
    setup_env.pip(sys.executable, [*args, "--progress-bar", "off"], tmp_path / "pip.log", tracker, status)
    status.show(*tracker.text(), final=True)
    assert (target / "pkg_a.py").is_file() and tracker.to_install == {"pkg-a", "pkg-b"}
    assert tracker.bytes == sum(w.stat().st_size for w in wheels)
    lines = out.getvalue().splitlines()  # not a terminal: one line per stage, nothing redrawn
    assert re.fullmatch(rf"Installed \[{'#' * 24}\] 2/2 packages, 0 MB of wheels \(\d+:\d\d\)", lines[-1])
    assert len(lines) <= 3 and "\r" not in out.getvalue()
    # while pip installs it prints nothing per package: the count comes from the .dist-info folders it finishes
    site = tmp_path / "site2"
    (site / "pkg_a-0.9.dist-info").mkdir(parents=True)
    (site / "pkg_a-0.9.dist-info" / "RECORD").write_text("", encoding="utf-8")
    tracker = setup_env.InstallTracker([site])
    tracker.feed("Installing collected packages: pkg-b, pkg_a\n")
    for name in ("pkg_b-1.0.dist-info", "pkg_a-1.0.dist-info"):
        (site / name).mkdir()
    (site / "pkg_b-1.0.dist-info" / "RECORD").write_text("", encoding="utf-8")  # pkg_a's is not finished yet
    tracker.poll()
    assert tracker.done == 1 and " 1/2 packages" in tracker.text()[0]


def test_image_packages_the_pins_break_are_removed_when_nothing_in_the_course_uses_them(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    for spec in [("hub", "2.0"), ("hub", "1.0"), ("kernels-like", "1.0", ("hub>=2",)),
                 ("plugin", "1.0", ("kernels-like",)),
                 ("tqdm", "99.0", ("hub>=2",)), ("old-tool", "1.0", ("hub<0.5",))]:
        write_wheel(wheels, *spec)
    venv.EnvBuilder(with_pip=True).create(tmp_path / "image")
    python = str(tmp_path / "image" / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    subprocess.run([*pip, "hub==2.0", "plugin", "tqdm==99.0"], check=True, capture_output=True)
    subprocess.run([*pip, "--no-deps", "old-tool"], check=True, capture_output=True)  # broken before the set-up
    log = tmp_path / "pip.log"
    before, image = setup_env.problems(python, log), setup_env.installed(python)
    assert before == ["old-tool 1.0 has requirement hub<0.5, but you have hub 2.0."]
    subprocess.run([*pip, "hub==1.0"], check=True, capture_output=True)  # the course's pin
    removed = setup_env.remove_conflicts(python, image, before, dev=False, log=log)
    # kernels-like needed the newer hub; plugin needed kernels-like: both go. tqdm is the course's: it stays,
    # and so does what was broken before
    assert removed == {"kernels-like": "needs hub>=2", "plugin": "needs kernels-like"}
    after = setup_env.problems(python, log)
    assert after == ["old-tool 1.0 has requirement hub<0.5, but you have hub 1.0.",
                     "tqdm 99.0 has requirement hub>=2, but you have hub 1.0."]
    assert setup_env.report_check(after, before).splitlines() == [
        "pip check: 2 broken requirements (1 were there before the set-up):",
        "  tqdm 99.0 has requirement hub>=2, but you have hub 1.0.",
        "  old-tool 1.0 has requirement hub<0.5, but you have hub 1.0."]
    assert setup_env.report_check([], before) == "pip check: no broken requirements."


# A GPU notebook image as ModelScope/Colab ship them, from the package index: an older CUDA torch (with its
# nvidia-* libraries) and newer transformers / huggingface_hub / datasets / diffusers than the course pins,
# plus `kernels`, which needs huggingface_hub>=1.32 and which nothing in the course uses.
IMAGE = os.environ.get("KOLORS_SETUP_IMAGE", "torch==2.6.0 transformers==5.25.0 huggingface_hub==2.4.0 datasets==5.2.0 "
                       "diffusers==0.42.1 kernels==0.19.1 ipykernel").split()
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # terminal control codes: escapes, carriage returns


def _texts(cell: dict) -> str:
    """Everything a saved code cell shows, as text."""
    parts = [o.get("text", "") if o["output_type"] == "stream" else [*o.get("data", {}).get("text/plain", ""), "\n"]
             for o in cell["outputs"]]  # a displayed value is a block of its own
    return "".join("".join(p) if isinstance(p, list) else p for p in parts)


def _image(tmp_path: Path) -> str:
    """A fresh venv holding IMAGE (network installs), registered as the Jupyter kernel 'image'."""
    venv.EnvBuilder(with_pip=True).create(tmp_path / "image")
    python = str(tmp_path / "image" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--progress-bar", "off", *IMAGE], check=True,
                   capture_output=True, timeout=1800)
    spec = tmp_path / "jupyter" / "kernels" / "image" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                "display_name": "image", "language": "python"}), encoding="utf-8")
    return python


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KOLORS_SETUP_CHECK") != "1", reason="network installs, ~10 min: make setup-check")
def test_00_setup_on_a_notebook_image_keeps_torch_and_leaves_pip_check_clean(tmp_path: Path) -> None:
    python = _image(tmp_path)
    torch_before = setup_env.installed(python)["torch"]
    check = [python, "-m", "pip", "check"]
    assert subprocess.run(check, capture_output=True).returncode == 0  # the image is consistent to start with
    # a clone of the repository in the notebook's folder; the kernel starts there (as on Colab / ModelScope)
    clone = tmp_path / "content" / "kolors-course"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    out = tmp_path / "00_setup.ipynb"
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "papermill", str(clone / "notebooks" / "00_setup.ipynb"), str(out),
                    "-k", "image", "--cwd", str(clone.parent)], check=True, timeout=1800,
                   env={**os.environ, "JUPYTER_PATH": str(tmp_path / "jupyter")})
    took = time.monotonic() - start
    cells = [c for c in json.loads(out.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
    shown = "".join(_texts(c) for c in cells)
    (install,) = [c for c in cells if "install" in c["metadata"].get("tags", [])]
    text = _texts(install)
    print(f"\n--- the install cell's saved output ({len(text.splitlines())} lines), papermill {took:.0f} s ---\n{text}")
    assert not CONTROL.search(shown.replace("\n", "")), "terminal control codes in the saved output"
    assert shown.count("no NVIDIA GPU") == 1
    assert not [o for c in cells[:2] for o in c["outputs"] if o["output_type"] == "execute_result"]  # no bare False
    assert len(text.splitlines()) <= 30
    assert len([x for x in text.splitlines() if x.startswith("Installed [")]) == 1  # one progress line, finished
    log = Path(re.search(r"^pip's full log: (\S+)$", text, re.M)[1])
    assert "Successfully installed" in log.read_text(encoding="utf-8")
    assert re.search(r"^  kernels 0\.19\.1: needs huggingface-hub>=1\.32", text, re.M)
    assert "pip check: no broken requirements." in text
    after = setup_env.installed(python)
    assert after["torch"] == torch_before and after["transformers"] == "4.57.6" and "kernels" not in after
    assert subprocess.run(check, capture_output=True).returncode == 0
    assert subprocess.run([python, "-c", "import diffsynth, kolors_lib"], capture_output=True).returncode == 0
