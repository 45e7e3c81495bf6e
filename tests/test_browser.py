"""A learner's first step, through a real browser: JupyterLab + headless Chromium run notebook 01.

The test starts its own JupyterLab on loopback (settings and work dir in a temp folder), opens a copy of
`01_download_dataset.ipynb` (parameters set to the tiny profile and a temp work dir), runs every cell from
the Run menu and checks that the image grid is shown and nothing failed.

Needs the `playwright` package and a Chromium (Debian: `apt-get install -y chromium`; `CHROMIUM` may name
another binary). Outside CI it skips when either is missing; in CI (`CI=true`) that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_download_dataset.ipynb"
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

# Generous: the machine running this may have two busy cores.
SERVER_START_S = 120
PAGE_LOAD_S = 120
KERNEL_READY_S = 120
RUN_ALL_S = 240
SERVER_STOP_S = 30

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# JupyterLab user settings for the test's own settings dir: every cell attached to the DOM (so outputs of
# cells out of view can be checked), no news / update checks, no extension manager (no network).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
}

# Truthy once the notebook's kernel is started, connected and idle.
KERNEL_READY_JS = """
() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const indicator = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  if (!indicator || indicator.getAttribute('data-status') !== 'idle') return false;
  return [...document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-TextItem')]
    .map(e => e.textContent.trim()).some(t => /^.+ \\| Idle$/.test(t) && !t.startsWith('No Kernel'));
}
"""

# Truthy once cells are queued or have run.
RUN_STARTED_JS = """
() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')]
  .some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))
"""

# Truthy once the run is over: kernel idle and no cell queued or running ([*]). Run All queues every cell at
# once, and an error clears the prompts of the cells still queued, so a finished run shows no [*].
RUN_FINISHED_JS = """
() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const indicator = panel && panel.querySelector('.jp-Notebook-ExecutionIndicator');
  if (!indicator || indicator.getAttribute('data-status') !== 'idle') return false;
  return ![...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].some(e => e.textContent.includes('*'));
}
"""

# An error output (IPython's traceback, or the "SyntaxError: ..." of a cell that does not parse) on stderr.
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\w*(Error|Exception)\b", re.MULTILINE)


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (required in CI)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def chromium() -> str:
    """Path of the Chromium binary (checked before any server starts), or skip / fail."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the `playwright` package is not installed (pip install playwright)")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        _missing("no Chromium found (apt-get install -y chromium, or set CHROMIUM)")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server (it shuts its kernels down); kill it if it does not stop in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()  # its kernel exits by itself once its parent is gone (ipykernel's parent poller)
        proc.wait(timeout=SERVER_STOP_S)


def _lab_settings(settings_dir: Path) -> None:
    for rel, values in LAB_SETTINGS.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


def _notebook_copy(folder: Path, workdir: Path) -> Path:
    """01 with its parameters cell set to the tiny profile and `workdir`."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "01 needs exactly one cell tagged 'parameters'"
    lines = "".join(params[0]["source"]).splitlines()
    wanted = {"profile": json.dumps("tiny"), "workdir": json.dumps(str(workdir))}
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0].strip()
        if name in wanted:
            lines[i] = f"{name} = {wanted.pop(name)}"
    lines += [f"{name} = {value}" for name, value in wanted.items()]
    params[0]["source"] = "\n".join(lines)
    target = folder / NOTEBOOK.name
    target.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab of this test's own on loopback: (base url, token, root dir). Always stopped."""
    root = tmp_path / "lab"
    root.mkdir()
    jupyter = tmp_path / "jupyter"
    _lab_settings(jupyter / "user-settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(jupyter / "config"), JUPYTER_DATA_DIR=str(jupyter / "data"),
               JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
        "--ServerApp.allow_root=True", "--ServerApp.terminals_enabled=False",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.user_settings_dir={jupyter / 'user-settings'}",
        f"--LabApp.workspaces_dir={jupyter / 'workspaces'}",
    ]
    log = tmp_path / "jupyter-lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
            try:
                req = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in {SERVER_START_S} s:\n{_tail(log)}", pytrace=False)
            time.sleep(0.5)
        yield base, token, root
    finally:
        _stop(proc)


@pytest.mark.slow
def test_notebook_01_runs_in_jupyterlab(chromium: str, lab: tuple[str, str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    base, token, root = lab
    workdir = tmp_path / "wd"
    notebook = _notebook_copy(root, workdir)
    code_cells = sum(c["cell_type"] == "code" for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"])
    shot = tmp_path / "notebook-01.png"
    log = tmp_path / "jupyter-lab.log"
    console: list[str] = []

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, service_workers="block",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)

            def where(step: str) -> str:
                try:
                    page.screenshot(path=str(shot))
                except PlaywrightError:
                    pass
                return (f"{step}; screenshot: {shot}\nbrowser console errors: {console[-10:]}\n"
                        f"server log tail:\n{_tail(log, 2000)}")

            try:
                page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", wait_until="domcontentloaded",
                          timeout=PAGE_LOAD_S * 1000)
                panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
                # the notebook attaches its cells in batches: wait for all of them, then for an idle kernel
                expect(panel.locator(".jp-CodeCell")).to_have_count(code_cells, timeout=PAGE_LOAD_S * 1000)
                # the toolbar indicator says "idle" before any kernel exists: wait for the status bar's
                # "Python 3 (ipykernel) | Idle" (it reads "No Kernel | Initializing", "… | Connecting" before)
                page.wait_for_function(KERNEL_READY_JS, timeout=KERNEL_READY_S * 1000, polling=250)
            except (PlaywrightError, AssertionError) as e:
                pytest.fail(where(f"notebook or kernel not ready: {str(e).splitlines()[0]}"), pytrace=False)

            # Run → Run All Cells, as a learner does
            try:
                page.locator(".lm-MenuBar").get_by_text("Run", exact=True).first.click()
                page.locator(".lm-Menu").get_by_role("menuitem", name="Run All Cells", exact=True).click()
            except PlaywrightError as e:
                pytest.fail(where(f"could not use Run → Run All Cells: {e.message.splitlines()[0]}"), pytrace=False)

            started = time.monotonic()
            try:
                page.wait_for_function(RUN_STARTED_JS, timeout=KERNEL_READY_S * 1000, polling=250)
            except PlaywrightError:
                pytest.fail(where(f"Run All Cells did not start any cell in {KERNEL_READY_S} s"), pytrace=False)
            try:
                page.wait_for_function(RUN_FINISHED_JS, timeout=RUN_ALL_S * 1000, polling=500)
            except PlaywrightError:
                prompts = panel.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
                pytest.fail(where(f"run did not finish in {RUN_ALL_S} s (prompts {prompts})"), pytrace=False)
            elapsed = time.monotonic() - started

            # error outputs render as stderr text; plain warnings on stderr are allowed
            stderr = panel.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
            errors = [t for t in stderr.all_inner_texts() if ERROR_TEXT.search(t)]
            images = panel.locator('.jp-OutputArea-output img[src^="data:image/png"]')
            if images.count():
                images.first.scroll_into_view_if_needed()
            page.screenshot(path=str(shot))
            if errors:
                pytest.fail(where(f"error output after Run All ({elapsed:.0f} s):\n" + "\n".join(errors)[-3000:]),
                            pytrace=False)
            prompts = panel.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
            assert all(p.strip("[]: ").isdigit() for p in prompts), where(f"not every cell ran: {prompts}")
            assert images.count() >= 1, where("no PNG image in the outputs")
            assert images.first.evaluate("img => img.complete && img.naturalWidth > 0"), where("image not decoded")
        finally:
            context.close()

    assert (workdir / "data/raw/metadata.jsonl").is_file(), f"no metadata.jsonl in {workdir}; screenshot: {shot}"
    assert (workdir / "data/raw/metadata.jsonl").read_text(encoding="utf-8").strip()
