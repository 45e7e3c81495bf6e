"""Install the course's pinned dependencies: into ./.venv (make) or into this Python (Colab/ModelScope).

    python3 scripts/setup_env.py --venv .venv   # what `make` runs; creates the venv once
    python scripts/setup_env.py --here          # what notebooks/00_setup.ipynb runs

A torch that is already there (the CUDA build on GPU notebook images) is kept and pinned;
where there is none, torch==2.13.0 (the CPU build on CPU machines) is installed first.
pip's own output shows the progress. `--here` first says whether there is a GPU, and at the end
lists which of the image's packages it replaced (e.g. transformers 5.x -> 4.57.6) and that the
kernel must be restarted.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TORCH = "2.13.0"
NO_GPU = ("WARNING: no NVIDIA GPU in this notebook. Training (step 03) and the real Kolors need a CUDA GPU "
          "(ModelScope: start a GPU instance; Colab: Runtime > Change runtime type > T4 GPU). On this CPU the "
          "'tiny' profile still runs every step, with a small random-weight Kolors, to learn the workflow.")
RESTART = ("Done. Now RESTART THE KERNEL (Jupyter: Kernel > Restart Kernel; Colab: Runtime > Restart session) "
           "so that Python imports the versions just installed, then open 01_download_dataset.ipynb.")


def run(cmd: list[str], stream: bool = False) -> None:
    """Run a command, echoing it and how long it took, and stop on failure.

    stream: pass its output on line by line through Python (a notebook shows a child's output only so);
    otherwise it writes straight to the terminal, where pip draws its progress bars.
    """
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    if stream:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            for line in proc.stdout:
                print(line, end="", flush=True)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
    else:
        subprocess.run(cmd, check=True)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def gpu_names() -> list[str]:
    """The NVIDIA GPUs `nvidia-smi` lists ("name, memory"), none when there is no driver or GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def check_gpu() -> bool:
    """Print which GPU this machine has, or a warning that training needs one; True when there is one."""
    gpus = gpu_names()
    print(f"GPU: {'; '.join(gpus)}" if gpus else NO_GPU, flush=True)
    return bool(gpus)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """{package: version} of what `python` has installed (pip list)."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True)
    return {_canonical(p["name"]): p["version"] for p in json.loads(out.stdout)}


def changes(before: dict[str, str], after: dict[str, str]) -> str:
    """What an install replaced, added and removed, as lines to print."""
    replaced = [f"  {n:28} {before[n]} -> {after[n]}" for n in sorted(before.keys() & after.keys())
                if before[n] != after[n]]
    added = [f"{n} {after[n]}" for n in sorted(after.keys() - before.keys())]
    removed = [f"{n} {before[n]}" for n in sorted(before.keys() - after.keys())]
    lines = [f"Replaced in this Python ({len(replaced)} packages, version before -> now):", *replaced] if replaced \
        else ["Nothing that was installed before was replaced."]
    if added:
        lines.append(f"Added ({len(added)}): " + ", ".join(added))
    if removed:
        lines.append(f"Removed ({len(removed)}): " + ", ".join(removed))
    return "\n".join(lines)


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


def torch_constraints(python: str, stream: bool = False) -> list[str]:
    """Pins that keep the installed torch (and a matching torchvision) from being replaced."""
    torch_version = probe(python, "import torch; print(torch.__version__.split('+')[0])")
    if torch_version is None:
        run([python, "-m", "pip", "install", "--disable-pip-version-check", f"torch=={DEFAULT_TORCH}"], stream)
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


def install(python: str, dev: bool, stream: bool = False) -> None:
    """Install the pinned requirements, the no-deps ones, and this package (editable), showing pip's output."""
    constraints = ROOT / ".constraints.txt"
    constraints.write_text("\n".join(torch_constraints(python, stream)) + "\n", encoding="utf-8")
    reqs = ["-r", str(ROOT / "requirements.txt")]
    if dev:
        reqs += ["-r", str(ROOT / "requirements-dev.txt")]
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    run([*pip, "-c", str(constraints), *reqs], stream)
    run([*pip, "--no-deps", "-r", str(ROOT / "requirements-nodeps.txt")], stream)
    run([*pip, "--no-deps", "-e", str(ROOT)], stream)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--venv", type=Path, help="create/use this virtual environment")
    where.add_argument("--here", action="store_true", help="install into the Python running this script")
    parser.add_argument("--no-dev", action="store_true", help="skip test tools (pytest, ruff)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.venv:
        print(f"Setting up {args.venv} with the course's pinned packages: about 4-7 minutes on a 2-core machine "
              f"(pip shows what it does).", flush=True)
        install(make_venv(args.venv), dev=not args.no_dev)
        print(f"{args.venv} is ready ({(time.monotonic() - start) / 60:.1f} min).", flush=True)
        return 0
    # a notebook image (ModelScope, Colab): say what it lacks before the long install, and what changed after
    check_gpu()
    print("Installing the course's pinned packages into this Python: about 5-7 minutes.", flush=True)
    before = installed(sys.executable)
    install(sys.executable, dev=not args.no_dev, stream=True)
    print(changes(before, installed(sys.executable)), flush=True)
    print(f"({(time.monotonic() - start) / 60:.1f} min) {RESTART}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
