"""The pins live in requirements.txt; environment.yml and the installed venv must agree."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _requirements(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_environment_yml_agrees_with_requirements() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip_section) == sorted(_requirements(ROOT / "requirements.txt"))


def test_installed_versions_match_pins() -> None:
    for line in _requirements(ROOT / "requirements.txt") + _requirements(ROOT / "requirements-nodeps.txt"):
        req = Requirement(line)
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"


def test_pyproject_reads_requirements_file() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "dependencies" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    assert "torch" not in {Requirement(r).name for r in _requirements(ROOT / "requirements.txt")}
