"""The library as a learner meets it from their own notebook: `__all__`, short help(), one-line docstrings."""

from __future__ import annotations

import importlib
import inspect
import pydoc

import pytest

LEARNER_MODULES = ["config", "data", "filtering", "training", "generation", "renderer", "story", "selection",
                   "scoring", "export", "publish", "inputs"]


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
    import kolors_lib.training as training

    text = pydoc.render_doc(training, renderer=pydoc.plaintext)
    assert len(text.splitlines()) < 300, f"help(kolors_lib.training) is {len(text.splitlines())} lines"
    assert "train_lora(" in text and "LightningModule" not in text
    assert training.KolorsLoraModule  # still importable for who needs it


def test_render_is_exported_from_the_package() -> None:
    import kolors_lib
    from kolors_lib.generation import render

    assert "render" in kolors_lib.__all__ and kolors_lib.render is render


def test_load_config_documents_the_override_format() -> None:
    from kolors_lib.config import load_config

    doc = inspect.getdoc(load_config)
    assert '{"train": {"steps": 5}}' in doc and '{"train.steps": 5}' in doc
