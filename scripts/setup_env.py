"""Install the course's pinned dependencies: into ./.venv (make) or into this Python (Colab/ModelScope).

    python3 scripts/setup_env.py --venv .venv   # what `make` runs; creates the venv once
    python scripts/setup_env.py --here          # what notebooks/00_setup.ipynb runs

A torch that is already there (the CUDA build on GPU notebook images) is kept and pinned;
where there is none, torch==2.13.0 (the CPU build on CPU machines) is installed first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TORCH = "2.13.0"


def run(cmd: list[str]) -> None:
    """Run a command, echoing it, and stop on failure."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def probe(python: str, code: str) -> str | None:
    """Output of `python -c code`, or None when it fails."""
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def make_venv(path: Path) -> str:
    """Create the venv once; it sees the system's packages when the system already has torch."""
    python = path / "bin" / "python"
    if not python.exists():
        system_torch = probe(sys.executable, "import torch") is not None
        print(f"creating {path} (system site-packages: {system_torch})", flush=True)
        venv.EnvBuilder(with_pip=True, system_site_packages=system_torch).create(path)
    return str(python)


def torch_constraints(python: str) -> list[str]:
    """Pins that keep the installed torch (and a matching torchvision) from being replaced."""
    torch_version = probe(python, "import torch; print(torch.__version__.split('+')[0])")
    if torch_version is None:
        run([python, "-m", "pip", "install", f"torch=={DEFAULT_TORCH}"])
        torch_version = DEFAULT_TORCH
    pins = [f"torch=={torch_version}"]
    vision = probe(python, "import importlib.metadata as m; print(m.version('torchvision').split('+')[0])")
    if vision is None:
        major, minor = (int(x) for x in torch_version.split(".")[:2])
        # torchvision 0.(minor+15) is built for torch 2.minor
        vision = f"0.{minor + 15}.0" if major == 2 else None
    if vision:
        pins.append(f"torchvision=={vision}")
    return pins


def install(python: str, dev: bool) -> None:
    """Install the pinned requirements, the no-deps ones, and this package (editable)."""
    constraints = ROOT / ".constraints.txt"
    constraints.write_text("\n".join(torch_constraints(python)) + "\n", encoding="utf-8")
    reqs = ["-r", str(ROOT / "requirements.txt")]
    if dev:
        reqs += ["-r", str(ROOT / "requirements-dev.txt")]
    run([python, "-m", "pip", "install", "-q", "-c", str(constraints), *reqs])
    run([python, "-m", "pip", "install", "-q", "--no-deps", "-r", str(ROOT / "requirements-nodeps.txt")])
    run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)])


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--venv", type=Path, help="create/use this virtual environment")
    where.add_argument("--here", action="store_true", help="install into the Python running this script")
    parser.add_argument("--no-dev", action="store_true", help="skip test tools (pytest, ruff)")
    args = parser.parse_args(argv)
    python = make_venv(args.venv) if args.venv else sys.executable
    install(python, dev=not args.no_dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
