"""Issue 9's targets, kept: short functions, one exception root, one atomic writer (scripts/code_stats.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "code_stats.py"


@pytest.fixture(scope="module")
def stats():
    """The figures of the working tree's kolors_lib, by the script that writes the issue's table."""
    spec = importlib.util.spec_from_file_location("code_stats", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.collect(None, long_limit=60)


def test_no_function_is_over_60_lines(stats) -> None:
    assert stats.long_functions == []


def test_every_course_error_has_one_root(stats) -> None:
    assert stats.exception_roots == ["core/errors.py:CourseError"]


def test_temp_file_then_replace_is_written_once(stats) -> None:
    assert stats.atomic_writers == ["core/files.py:atomic_path"]
