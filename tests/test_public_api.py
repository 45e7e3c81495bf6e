"""The library as a learner meets it from their own notebook: `__all__`, short help(), one-line docstrings."""

from __future__ import annotations

import importlib
import inspect
import pydoc

import pytest

LEARNER_MODULES = ["core.config", "data.importer", "clean.pipeline", "train.training", "storyboard.storyboard",
                   "kolors.renderer", "kolors.story", "storyboard.selection", "score.scoring", "kolors.lora",
                   "publishing.publish", "core.inputs"]
STEP_FUNCTIONS = ["load_config", "import_dataset", "filter_dataset", "train_lora", "render_storyboard", "render",
                  "score_folder", "publish"]


@pytest.mark.parametrize("name", LEARNER_MODULES)
def test_every_learner_module_lists_its_api_with_one_line_docstrings(name: str) -> None:
    module = importlib.import_module(f"kolors_lib.{name}")
    assert isinstance(getattr(module, "__all__", None), list), f"kolors_lib.{name} has no __all__"
    for attr in module.__all__:
        obj = getattr(module, attr)  # every listed name exists
        if inspect.isfunction(obj) or inspect.isclass(obj):
            doc = inspect.getdoc(obj) or ""
            assert doc.strip() and doc.splitlines()[0].strip(), f"kolors_lib.{name}.{attr} has no docstring"


def test_help_of_training_is_short_and_shows_train_lora() -> None:
    import kolors_lib.train.training as training

    text = pydoc.render_doc(training, renderer=pydoc.plaintext)
    assert len(text.splitlines()) < 300, f"help(kolors_lib.train.training) is {len(text.splitlines())} lines"
    assert "train_lora(" in text and "LightningModule" not in text


def test_the_learners_face_is_one_import_line() -> None:
    """`from kolors_lib import load_config, ..., publish` gives each step's function from its own folder."""
    import kolors_lib
    from kolors_lib.clean.pipeline import filter_dataset
    from kolors_lib.core.config import load_config
    from kolors_lib.data.importer import import_dataset
    from kolors_lib.publishing.publish import publish
    from kolors_lib.score.scoring import score_folder
    from kolors_lib.storyboard.storyboard import render, render_storyboard
    from kolors_lib.train.training import train_lora

    homes = [load_config, import_dataset, filter_dataset, train_lora, render_storyboard, render, score_folder, publish]
    assert set(STEP_FUNCTIONS) <= set(kolors_lib.__all__)
    assert [getattr(kolors_lib, name) for name in STEP_FUNCTIONS] == homes


def test_importing_the_package_loads_no_step() -> None:
    """The face is lazy: `import kolors_lib` (and so `python -m kolors_lib --help`) imports no torch and no step."""
    import subprocess
    import sys

    code = ("import sys, kolors_lib\n"
            "print(sorted(m for m in sys.modules if m.startswith('kolors_lib.') or m in ('torch', 'diffsynth')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_config_documents_the_override_format() -> None:
    from kolors_lib.core.config import load_config

    doc = inspect.getdoc(load_config)
    assert '{"train": {"steps": 5}}' in doc and '{"train.steps": 5}' in doc
