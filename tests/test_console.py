"""Step logs keep other libraries' chatter out of the learner's view; progress bars end in their final state."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from kolors_lib import load_config
from kolors_lib.core.console import logged_step, progress, step_log


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(profile="tiny", workdir=tmp_path / "wd")


@pytest.fixture
def library_logger():
    """A logger set up the way Lightning does at import: its own handler on the console, no propagation."""
    lg = logging.getLogger("test_console.library")
    handler = logging.StreamHandler(sys.stderr)
    lg.addHandler(handler)
    lg.propagate = False
    yield lg
    lg.removeHandler(handler)


def _pil_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make PIL (a library) raise a real DecompressionBombWarning from its own code."""
    path = tmp_path / "big.png"
    Image.new("RGB", (15, 10)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.open(path).close()


def test_step_log_files_library_chatter_and_shows_yours(cfg, capsys, library_logger, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with step_log(cfg, "03_train") as log:
            print("Using sdxl_unet from /models/unet.safetensors.")  # DiffSynth prints like this
            library_logger.info("GPU available: False, used: False")
            library_logger.warning("TPU available: False")
            _pil_warning(tmp_path, monkeypatch)
            warnings.warn("your own warning stays visible", UserWarning, stacklevel=1)
        library_logger.warning("after the step: the console again")
    seen = capsys.readouterr()
    text = log.read_text(encoding="utf-8")
    assert log == cfg.workdir / "logs" / "03_train.log"
    for line in ("Using sdxl_unet from", "TPU available", "DecompressionBombWarning"):
        assert line in text
        assert line not in seen.out + seen.err
    assert [str(w.message) for w in shown] == ["your own warning stays visible"]
    assert "your own warning" not in text
    assert "after the step: the console again" in seen.err and "after the step" not in text


def test_a_step_inside_a_step_writes_the_outer_log_and_errors_name_it(cfg, capsys) -> None:
    @logged_step("06_publish")
    def inner(cfg) -> None:
        print("inner chatter")

    @logged_step("06_publish")
    def outer(cfg) -> None:
        inner(cfg)
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input") as err:
        outer(cfg)
    log = cfg.logs_dir / "06_publish.log"
    assert "inner chatter" in log.read_text(encoding="utf-8")
    assert "inner chatter" not in capsys.readouterr().out
    if sys.version_info >= (3, 11):
        assert str(log) in "".join(err.value.__notes__)


def test_terminal_progress_bar_stays_on_the_console_inside_a_step(cfg, capsys) -> None:
    with step_log(cfg, "04_storyboard") as log:
        for _ in progress(range(3), desc="panels", mininterval=0):
            pass
    err = capsys.readouterr().err
    assert "panels" in err and "3/3" in err
    assert "panels" not in log.read_text(encoding="utf-8")


def _notebook(cells: list[str]) -> dict:
    return {"cells": [{"id": f"c{i}", "cell_type": "code", "metadata": {}, "source": c, "outputs": [],
                       "execution_count": None} for i, c in enumerate(cells)],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.slow
def test_saved_notebook_shows_finished_bars(tmp_path: Path) -> None:
    import papermill

    src, out = tmp_path / "bars.ipynb", tmp_path / "bars.out.ipynb"
    src.write_text(json.dumps(_notebook([
        "from kolors_lib.core.console import progress\nfor _ in progress(range(7), desc='LoRA steps'):\n    pass",
        "for _ in progress(range(5), desc='copy', leave=False):\n    pass",
        "bar = progress(total=4, desc='manual')\nbar.update(4)\nbar.close()",
        # a library's own bar inside a step (transformers' "Loading checkpoint shards") is not shown
        "from types import SimpleNamespace\nfrom pathlib import Path\nfrom tqdm.auto import tqdm\n"
        "from kolors_lib.core.console import step_log\n"
        "with step_log(SimpleNamespace(logs_dir=Path('logs')), '03_train'):\n"
        "    for _ in tqdm(range(3), desc='Loading checkpoint shards'):\n        pass\n"
        "    for _ in progress(range(2), desc='LoRA steps'):\n        pass",
    ])), encoding="utf-8")
    papermill.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    cells = json.loads(out.read_text(encoding="utf-8"))["cells"]
    texts = [["".join(o.get("data", {}).get("text/plain", "")) for o in c["outputs"]] for c in cells]
    assert any("LoRA steps" in t and "7/7" in t and "100%" in t for t in texts[0]), texts[0]
    assert all(t.strip() == "" for t in texts[1]), texts[1]  # leave=False: nothing left behind
    assert any("4/4" in t for t in texts[2]), texts[2]
    assert not any("Loading checkpoint shards" in t for t in texts[3]) and any("2/2" in t for t in texts[3])
    assert not any("0/" in t for ts in texts for t in ts)


SAME_KERNEL = """
import logging
from kolors_lib import load_config
from kolors_lib.data.importer import import_dataset
from kolors_lib.clean.pipeline import filter_dataset

cfg = load_config(profile="tiny", workdir={workdir!r})
import_dataset(cfg)
filter_dataset(cfg)  # Data-Juicer imports its ops, some of which call logging.basicConfig(level=INFO)
print("root handlers after step 02:", len(logging.getLogger().handlers))
print("---- step 03")
from kolors_lib.train.training import train_lora  # Lightning imported after Data-Juicer, as in one notebook kernel

train_lora(cfg, steps=2)
"""


@pytest.mark.slow
def test_steps_02_then_03_in_one_process_print_no_library_lines(tmp_path: Path) -> None:
    import subprocess

    workdir = tmp_path / "wd"
    out = subprocess.run([sys.executable, "-c", SAME_KERNEL.format(workdir=str(workdir))], capture_output=True,
                         text=True, timeout=1200, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "root handlers after step 02: 0" in out.stdout  # Data-Juicer's basicConfig does not outlive its step
    after = out.stdout.split("---- step 03", 1)[1] + out.stderr
    assert "GPU available" not in after and "TPU available" not in after
    log = (workdir / "logs" / "03_train.log").read_text(encoding="utf-8")
    assert log.count("GPU available: False") == 1  # Lightning's lines once, in the step's log
