"""Install the course's pinned dependencies: into ./.venv (make) or into this Python (Colab/ModelScope).

    python3 scripts/setup_env.py --venv .venv   # what `make` runs; creates the venv once
    python scripts/setup_env.py --here          # what notebooks/00_setup.ipynb runs

A torch that is already there (the CUDA build on GPU notebook images) is kept and pinned;
where there is none, torch==2.13.0 (the CPU build on CPU machines) is installed with the rest.
pip's full output goes to a log file (workdir/setup/); the screen shows one progress line.
`--here` first says whether there is a GPU; at the end it lists which of the image's packages it
replaced (e.g. transformers 5.x -> 4.57.6), added and removed, runs `pip check`, and says that the
kernel must be restarted. Packages of the image that the new pins break and that nothing in the
course uses (e.g. `kernels`, which needs huggingface-hub>=1.32) are uninstalled and named.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "workdir" / "setup"
DEFAULT_TORCH = "2.13.0"
# Measured by `make setup-check` (README, "Running the course for real"): keep these figures in step with it.
TIME_NOTE = ("measured: 1-5 min on a 2-core machine, 459 MB of wheels from PyPI and a local mirror; "
             "a 2 MB/s link adds about 4 min to download them (estimate)")
NO_GPU = ("WARNING: no NVIDIA GPU in this notebook. Training (step 03) and the real Kolors need a CUDA GPU "
          "(ModelScope: start a GPU instance; Colab: Runtime > Change runtime type > T4 GPU). On this CPU the "
          "'toy' profile still runs every step, with a small Kolors trained once on a toy world of shapes.")
RESTART = ("Done. Now RESTART THE KERNEL (Jupyter: Kernel > Restart Kernel; Colab: Runtime > Restart session) "
           "so that Python imports the versions just installed, then open 01_download_dataset.ipynb.")
PIP_FLAGS = ["--disable-pip-version-check", "--no-color"]
SIZE = re.compile(r"\((\d+(?:\.\d+)?) (bytes|kB|MB|GB)\)\s*$")
UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
# pip check's lines: "A 1.0 has requirement B>=2, but you have B 1.0." / "A 1.0 requires B, which is not installed."
PROBLEM = re.compile(r"^(\S+) (\S+) (?:has requirement |requires |is not supported)(.*?)(?:, but you have .*"
                     r"|, which is not installed\.| on this platform\.?)?$")


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


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """{package: version} of what `python` has installed (pip list)."""
    out = subprocess.run([python, "-m", "pip", "list", "--format=json", *PIP_FLAGS],
                         capture_output=True, text=True, check=True)
    return {canonical(p["name"]): p["version"] for p in json.loads(out.stdout)}


def changes(before: dict[str, str], after: dict[str, str], removed: dict[str, str] | None = None) -> str:
    """What an install replaced, added and removed, as lines to print.

    removed: {package: why} for the packages the set-up uninstalled on purpose (see `remove_conflicts`).
    """
    removed = removed or {}
    replaced = [f"  {n:28} {before[n]} -> {after[n]}" for n in sorted(before.keys() & after.keys())
                if before[n] != after[n]]
    added = [f"{n} {after[n]}" for n in sorted(after.keys() - before.keys())]
    gone = [n for n in sorted(before.keys() - after.keys()) if n not in removed]
    lines = [f"Replaced in this Python ({len(replaced)} packages, version before -> now):", *replaced] if replaced \
        else ["Nothing that was installed before was replaced."]
    if added:
        lines.append(f"Added ({len(added)}): " + ", ".join(added))
    if removed:
        lines.append(f"Removed ({len(removed)}): they conflict with the course's pins and nothing in the course "
                     "uses them:")
        lines += [f"  {n} {before.get(n, '')}: {why}" for n, why in sorted(removed.items())]
    if gone:
        lines.append(f"Removed by pip ({len(gone)}): " + ", ".join(f"{n} {before[n]}" for n in gone))
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


def torch_pins(python: str) -> tuple[list[str], list[str], str]:
    """(constraints, extra requirements, what to say): keep the installed torch, else install the default one."""
    torch_version = probe(python, "import importlib.metadata as m; print(m.version('torch'))")
    extra = [] if torch_version else [f"torch=={DEFAULT_TORCH}"]
    torch_version = (torch_version or DEFAULT_TORCH).split("+")[0]
    pins = [f"torch=={torch_version}"]
    vision = probe(python, "import importlib.metadata as m; print(m.version('torchvision'))")
    if vision is None:
        major, minor = (int(x) for x in torch_version.split(".")[:2])
        # torchvision 0.(minor+15) is built for torch 2.minor
        pins += [f"torchvision==0.{minor + 15}.0"] if major == 2 else []
    else:
        pins.append(f"torchvision=={vision.split('+')[0]}")
    say = (f"Installing torch {DEFAULT_TORCH} (none is installed)." if extra else
           f"Keeping the installed torch {torch_version}" + (f" and torchvision {vision}." if vision else "."))
    return pins, extra, say


class StatusLine:
    """One line of status redrawn in place: a display handle in a notebook, a carriage return on a
    terminal; elsewhere (a log, a pipe) a new line only when the message's phase changes."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.handle = None
        self.phase = ""
        shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
        if out is None and getattr(shell, "kernel", None) is not None:
            from IPython.display import display

            self.handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.tty = self.handle is None and self.out.isatty()
        self.width, self.last = 0, 0.0

    def show(self, text: str, phase: str = "", final: bool = False) -> None:
        """Replace the line with `text` (at most twice a second within a stage); `phase` names the stage,
        so a plain log gets one line per stage."""
        now = time.monotonic()
        if not final and phase == self.phase and now - self.last < 0.5:
            return
        if self.handle is not None:
            self.handle.update({"text/plain": text}, raw=True)
        elif self.tty:
            self.out.write("\r" + text.ljust(self.width) + ("\n" if final else ""))
            self.width = len(text)
        elif final or phase != self.phase:
            self.out.write(text + "\n")
        self.phase, self.last = phase, now
        self.out.flush()


def bar(done: int, total: int, width: int = 24) -> str:
    """A text progress bar: [######------]."""
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def clock(seconds: float) -> str:
    """m:ss."""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class InstallTracker:
    """Follows pip's output: packages collected and their wheel sizes, then the install list, and counts
    the packages installed so far by the new .dist-info folders pip finishes (it prints nothing per package)."""

    def __init__(self, site_dirs: list[Path]) -> None:
        self.site_dirs = site_dirs
        self.collected: set[str] = set()
        self.bytes = 0.0
        self.to_install: set[str] = set()
        self.present: set[str] = set()
        self.done = 0
        self.finished = False
        self.start = time.monotonic()

    def feed(self, line: str) -> None:
        """Take one line of pip's output."""
        line = line.strip()
        if line.startswith("Collecting "):
            self.collected.add(canonical(re.split(r"[\[<>=!~;( ]", line.split()[1])[0]))
        elif line.startswith("Processing "):
            self.collected.add(canonical(Path(line.split()[1]).name.split("-")[0]))
        if line.startswith("Processing ") and Path(line.split()[1]).is_file():
            self.bytes += Path(line.split()[1]).stat().st_size
        elif line.startswith(("Downloading ", "Using cached ")) and SIZE.search(line):
            number, unit = SIZE.search(line).groups()
            self.bytes += float(number) * UNITS[unit]
        elif line.startswith("Installing collected packages: "):
            self.to_install = {canonical(n) for n in line.split(": ", 1)[1].split(", ")}
            self.present = self.dist_infos()
        elif line.startswith("Successfully installed "):
            self.done, self.finished = len(self.to_install), True

    def dist_infos(self) -> set[str]:
        """The finished .dist-info folders (with RECORD, pip's last file) in site-packages."""
        return {d.name for s in self.site_dirs if s.is_dir() for d in os.scandir(s)
                if d.name.endswith(".dist-info") and os.path.exists(os.path.join(d.path, "RECORD"))}

    def poll(self) -> None:
        """Count the packages of the install list whose new .dist-info is finished."""
        if self.to_install and not self.finished:
            new = {canonical(n.split("-")[0]) for n in self.dist_infos() - self.present}
            self.done = len(new & self.to_install)

    def text(self) -> tuple[str, str]:
        """(the status line, its phase)."""
        took = clock(time.monotonic() - self.start)
        size = f"{self.bytes / 1e6:.0f} MB of wheels"
        if not self.to_install:
            return f"Resolving and fetching: {len(self.collected)} packages, {size} ({took})", "fetch"
        total = len(self.to_install)
        verb = "Installed" if self.finished else "Installing"
        return f"{verb} {bar(self.done, total)} {self.done}/{total} packages, {size} ({took})", "install"


def pip_lines(proc: subprocess.Popen) -> Iterator[str | None]:
    """The lines a process writes, and a None for every half second it writes none (to redraw a clock)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            yield None
            continue
        if line is None:
            return
        yield line


def pip(python: str, args: list[str], log: Path, tracker: InstallTracker | None = None,
        status: StatusLine | None = None) -> str:
    """Run `python -m pip ARGS`, its output appended to `log` (and fed to `tracker`); stop with a one-line
    message naming pip's error and the log when it fails. Returns the output."""
    cmd = [python, "-m", "pip", *args]
    out: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb"}
    with log.open("a", encoding="utf-8") as f, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        f.write("+ " + " ".join(cmd) + "\n")
        for line in pip_lines(proc):
            if line is not None:
                f.write(line)
                out.append(line)
                if tracker:
                    tracker.feed(line)
            if tracker and status:
                tracker.poll()
                status.show(*tracker.text())
    if proc.returncode:
        if tracker and status:
            status.show(*tracker.text(), final=True)  # end the progress line before the message
        errors = [x.strip() for x in out if x.startswith("ERROR")] or [x.strip() for x in out if x.strip()] or [""]
        raise SystemExit(f"pip failed (exit {proc.returncode}): {errors[-1]} Full log: {log}")
    return "".join(out)


def site_dirs(python: str) -> list[Path]:
    """Where `python` installs packages."""
    code = "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])"
    here = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths = here if python == sys.executable else (probe(python, code) or "").splitlines()
    return sorted({Path(p) for p in paths})


def requirement_files(dev: bool) -> list[Path]:
    """The course's requirement files."""
    return [ROOT / "requirements.txt", *([ROOT / "requirements-dev.txt"] if dev else [])]


def install(python: str, dev: bool, log: Path) -> str:
    """Install the pinned requirements, the no-deps ones and this package (editable) under one progress line;
    returns what was said about torch."""
    constraints = ROOT / ".constraints.txt"
    pins, extra, say = torch_pins(python)
    constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
    print(say, flush=True)
    reqs = [arg for path in requirement_files(dev) for arg in ("-r", str(path))]
    tracker, status = InstallTracker(site_dirs(python)), StatusLine()
    flags = ["install", *PIP_FLAGS, "--progress-bar", "off"]
    pip(python, [*flags, "-c", str(constraints), *reqs, *extra], log, tracker, status)
    pip(python, [*flags, "--no-deps", "-r", str(ROOT / "requirements-nodeps.txt")], log)
    pip(python, [*flags, "--no-deps", "-e", str(ROOT)], log)
    status.show(*tracker.text(), final=True)
    return say


def problems(python: str, log: Path) -> list[str]:
    """The broken requirements `pip check` reports (none: an empty list)."""
    out = subprocess.run([python, "-m", "pip", "check", *PIP_FLAGS], capture_output=True, text=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"+ {python} -m pip check\n{out.stdout}{out.stderr}")
    return [] if out.returncode == 0 else [x.strip() for x in out.stdout.splitlines() if PROBLEM.match(x.strip())]


def course_packages(dev: bool) -> set[str]:
    """Every package installed for this Python that the course's requirements need, directly or through others
    (with extras)."""
    from packaging.requirements import Requirement  # installed by now: transformers needs it

    importlib.invalidate_caches()
    lines = [x.split("#")[0].strip() for f in [*requirement_files(dev), ROOT / "requirements-nodeps.txt"]
             for x in f.read_text(encoding="utf-8").splitlines()]
    todo = [Requirement(x) for x in lines if x and not x.startswith("-")]
    todo += [Requirement(x) for x in ("torch", "torchvision", "kolors-lib", "pip", "setuptools", "wheel")]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            dep = Requirement(spec)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return seen


def problem_key(line: str) -> tuple[str, str]:
    """(package, the requirement it has) of a `pip check` line: the same before and after an install that changed
    the version it complains about."""
    m = PROBLEM.match(line)
    return (canonical(m[1]), m[3]) if m else (line, "")


def in_use() -> set[str]:
    """The packages this running Python has imported (the notebook's own kernel, IPython, ...)."""
    owners = md.packages_distributions()
    return {canonical(d) for m in list(sys.modules) for d in owners.get(m.split(".")[0], [])}


def remove_conflicts(python: str, image: dict[str, str], before: list[str], dev: bool, log: Path) -> dict[str, str]:
    """Uninstall the image's packages that `pip check` says the install broke and that neither the course
    nor this running Python uses (both read from this Python's metadata: `python` is the one running this, or one
    whose packages those do not concern); returns {package: the requirement it had}. Repeats while that frees more."""
    removed: dict[str, str] = {}
    keep = course_packages(dev) | in_use()
    for _ in range(5):
        old = {problem_key(x) for x in before}
        broken = {key[0]: key[1] for x in problems(python, log) if (key := problem_key(x)) not in old}
        drop = {n: why for n, why in broken.items() if n in image and n not in keep and n not in removed}
        if not drop:
            break
        pip(python, ["uninstall", *PIP_FLAGS, "-y", *drop], log)
        removed |= {n: f"needs {why}" for n, why in drop.items()}
    return removed


def new_log() -> Path:
    """A fresh log file for pip's full output (workdir/setup/pip-<UTC time>.log)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LOG_DIR / time.strftime("pip-%Y%m%d-%H%M%S.log", time.gmtime())


def report_check(now: list[str], before: list[str]) -> str:
    """One line (and the problems) saying what `pip check` finds after the set-up."""
    if not now:
        return "pip check: no broken requirements."
    keys = {problem_key(x) for x in before}
    old = [x for x in now if problem_key(x) in keys]
    new = [x for x in now if problem_key(x) not in keys]
    lines = [f"pip check: {len(now)} broken requirements ({len(old)} were there before the set-up):"]
    return "\n".join(lines + [f"  {x}" for x in new + old])


def setup_here(dev: bool = False) -> None:
    """Install the course into the Python running this (a notebook image), report what changed; returns nothing,
    so a notebook cell shows only what this prints."""
    start = time.monotonic()
    log = new_log()
    print(f"Installing the course's pinned packages into this Python ({TIME_NOTE}).\npip's full log: {log}",
          flush=True)
    python = sys.executable
    image, before = installed(python), problems(python, log)
    install(python, dev, log)
    removed = remove_conflicts(python, image, before, dev, log)
    print(changes(image, installed(python), removed), flush=True)
    print(report_check(problems(python, log), before), flush=True)
    print(f"({(time.monotonic() - start) / 60:.1f} min) {RESTART}", flush=True)


def setup_venv(path: Path, dev: bool) -> None:
    """Create/update the course's venv."""
    start = time.monotonic()
    log = new_log()
    print(f"Setting up {path} with the course's pinned packages (a few minutes); pip's full log: {log}", flush=True)
    python = make_venv(path)
    install(python, dev, log)
    print(report_check(problems(python, log), []), flush=True)
    print(f"{path} is ready ({(time.monotonic() - start) / 60:.1f} min).", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--venv", type=Path, help="create/use this virtual environment")
    where.add_argument("--here", action="store_true", help="install into the Python running this script")
    parser.add_argument("--no-dev", action="store_true", help="skip test tools (pytest, ruff)")
    args = parser.parse_args(argv)
    if args.venv:
        setup_venv(args.venv, dev=not args.no_dev)
    else:
        check_gpu()  # a notebook image: say what it lacks before the long install
        setup_here(dev=not args.no_dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
