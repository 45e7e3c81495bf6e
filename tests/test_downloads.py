"""The `full` profile's downloads against a loopback hub that speaks ModelScope's download protocol.

The modelscope client is not mocked: it talks HTTP to tests/ms_download_server.py, which serves the real
repos' file lists (tiny weights, fillers for what must never be fetched; tests/hub_repos.py). Fault cases
run the command line in a subprocess, with the client's retries turned down by its own environment
variables (it reads them at import), as a learner would see them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hub_repos import DATASET_ID, KOLORS_ID, dataset_repo, full_profile_repos
from ms_download_server import DownloadHub, Served

from kolors_lib.cli.main import main
from kolors_lib.core.config import load_config
from kolors_lib.core.downloads import MANIFEST, RepoFile, select
from kolors_lib.core.errors import DataError
from kolors_lib.data.importer import import_dataset, read_metadata
from kolors_lib.kolors.models import ALLOW_PATTERNS, kolors_paths, load_model_manager
from kolors_lib.offline_models.tiny import write_tiny_kolors

UNET = "unet/diffusion_pytorch_model.fp16.safetensors"
KEYS = ("kolors", "vae_fp16_fix", "aesthetic", "captioner")
FAST_FAILURE = {"MODELSCOPE_API_MAX_RETRIES": "0", "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "0",
                "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models (Kolors, VAE, scorer, VLM), written once for the module."""
    return write_tiny_kolors(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def repos(tiny: dict[str, Path]) -> dict[str, dict]:
    """The four model repos of the full profile, built from the tiny models."""
    return full_profile_repos(tiny)


@pytest.fixture
def hub(repos: dict[str, dict], monkeypatch: pytest.MonkeyPatch):
    """A fresh loopback hub serving the full profile's repos and lowres_anime; MODELSCOPE_ENDPOINT points at it."""
    with DownloadHub() as server:
        for repo_id, files in repos.items():
            server.add_model(repo_id, files)
        server.add_dataset(DATASET_ID, dataset_repo())
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
        yield server


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _models(workdir: Path, *extra: str) -> int:
    return main(["models", "--profile", "full", "--workdir", str(workdir), *extra])


def _cli(workdir: Path, endpoint: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **FAST_FAILURE, "MODELSCOPE_ENDPOINT": endpoint}
    return subprocess.run([sys.executable, "-m", "kolors_lib", "models", "--profile", "full", "--workdir",
                           str(workdir), *extra], capture_output=True, text=True, timeout=120, env=env)


def _listing(files: dict) -> list[RepoFile]:
    return [RepoFile(p, v.size if isinstance(v, Served) else len(v), None) for p, v in files.items()]


def test_allow_lists_take_exactly_the_files_the_course_loads(repos: dict[str, dict]) -> None:
    """Each allow list, run over the real repo's file list, takes the files the tiny profile runs the course
    on (every one served with real bytes) and none of the fillers (README, fp32 UNet, duplicate weights)."""
    cfg = load_config(profile="full")
    for key in KEYS:
        files = repos[getattr(cfg.models, key).model_id]
        taken = {f.path for f in select(_listing(files), ALLOW_PATTERNS[key])}
        assert taken == {p for p, v in files.items() if not isinstance(v, Served) or v.data is not None}, key
    kolors = {f.path for f in select(_listing(repos[KOLORS_ID]), ALLOW_PATTERNS["kolors"])}
    assert UNET in kolors and "unet/diffusion_pytorch_model.safetensors" not in kolors
    assert len([p for p in kolors if p.startswith("text_encoder/pytorch_model-")]) == 7


def test_dry_run_lists_the_allowed_files_with_the_hubs_sizes(hub: DownloadHub, tmp_path: Path, capsys) -> None:
    assert _models(tmp_path, "--dry-run") == 0
    out = capsys.readouterr().out
    listed = hub.listing(hub.model_repos[KOLORS_ID], None)
    sizes = {e["Path"]: e["Size"] for e in listed if e["Type"] == "blob"}
    assert f"{sizes[UNET]:,}" in out and "diffusion_pytorch_model.safetensors " not in out
    taken = select(_listing(hub.model_repos[KOLORS_ID]), ALLOW_PATTERNS["kolors"])
    assert f"{KOLORS_ID}: {len(taken)} files, {sum(f.size for f in taken):,} bytes" in out
    assert "total to download:" in out and hub.file_gets == []  # file lists only


def test_full_download_fetches_the_allow_list_once(hub: DownloadHub, repos: dict, tmp_path: Path, capsys) -> None:
    assert _models(tmp_path) == 0
    captured = capsys.readouterr()
    folders = json.loads(captured.out)
    cache = tmp_path / "models" / "modelscope"
    assert folders["kolors"] == str(cache / "models" / "Kwai-Kolors--Kolors" / "snapshots" / "master")
    assert hub.filler_requests == []  # never the fp32 UNet, the README, pytorch_model.bin...
    cfg = load_config(profile="full", workdir=tmp_path)
    for key in KEYS:
        model_id = getattr(cfg.models, key).model_id
        expected = {f.path for f in select(_listing(repos[model_id]), ALLOW_PATTERNS[key])}
        assert sorted(hub.fetched(model_id)) == sorted(expected), key
        record = json.loads((Path(folders[key]) / MANIFEST).read_text())
        assert record["complete"] and set(record["files"]) == expected
    unet = Path(folders["kolors"]) / UNET
    assert unet.read_bytes() == repos[KOLORS_ID][UNET]
    # a bar per file and the total with the time left, on the console
    assert f"{UNET}: 100%" in captured.err and f"{KOLORS_ID} (total): 100%" in captured.err
    assert "<00:00" in captured.err
    assert load_model_manager([kolors_paths(cfg).unet]).fetch_model("sdxl_unet") is not None

    # a second run: no request at all, and no re-hashing (a changed byte of the same size goes unnoticed)
    before = len(hub.requests)
    with unet.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00")
    assert _models(tmp_path) == 0 and len(hub.requests) == before


def test_a_complete_modelscope_download_is_used_with_the_hub_down(hub: DownloadHub, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The issue's first case: a copy modelscope 1.40.2 wrote (its layout; here without our record, as an
    older course version left it) and the hub down: every step still finds it."""
    assert _models(tmp_path) == 0
    folders = json.loads(capsys.readouterr().out)
    for folder in folders.values():
        (Path(folder) / MANIFEST).unlink()
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", _closed_port())
    assert _models(tmp_path) == 0
    assert json.loads(capsys.readouterr().out) == folders


def test_the_older_flat_cache_layout_is_used_offline(tiny: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", _closed_port())
    cache = tmp_path / "cache"
    shutil.copytree(tiny["kolors"], cache / "Kwai-Kolors" / "Kolors")
    cfg = load_config(profile="full", workdir=tmp_path, overrides={"models": {"cache_dir": str(cache)}})
    assert kolors_paths(cfg).unet == cache / "Kwai-Kolors/Kolors" / UNET


def test_a_half_finished_download_is_never_used_offline(hub: DownloadHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    hub.file_status["vae/config.json"] = 404
    assert _models(tmp_path) == 2
    err = capsys.readouterr().err
    assert "error: cannot download Kwai-Kolors/Kolors: file vae/config.json failed: the hub answered 404" in err
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", _closed_port())
    assert _models(tmp_path) == 2  # the record says the download stopped half-way: not taken as complete
    assert "is not reachable" in capsys.readouterr().err


FAULTS = {
    "list 500": ({"list_status": 500}, "its file list could not be read from", "the hub answered HTTP 500"),
    "list 404": ({"list_status": 404}, "its file list could not be read from", "the hub answered 404"),
    "file 404": ({"file_status": {UNET: 404}}, f"file {UNET} failed", "the hub answered 404"),
    "file 500": ({"file_status": {UNET: 500}}, f"file {UNET} failed", "the hub answered HTTP 500"),
    "wrong size": ({"wrong_size": {UNET}}, f"file {UNET} failed", "its size differs from the hub's file list"),
    "wrong sha256": ({"wrong_sha": {UNET}}, f"file {UNET} failed", "its sha256 differs from the hub's file list"),
    "dropped mid-file": ({"drop_file": {UNET: 1}}, f"file {UNET} failed", "the connection to the hub failed"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_download_fault_is_one_error_line_and_the_next_run_finishes(fault: str, hub: DownloadHub,
                                                                         tmp_path: Path) -> None:
    switches, where, cause = FAULTS[fault]
    for name, value in switches.items():
        setattr(hub, name, value)
    failed = _cli(tmp_path, hub.url)
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert "Traceback" not in failed.stderr and sum(line.startswith("error:") for line in lines) == 1
    line = lines[-1]
    assert line.startswith(f"error: cannot download {KOLORS_ID}: ") and where in line and cause in line, line
    assert "again" in line and "models.kolors.local_dir" in line
    folder = tmp_path / "models/modelscope/models/Kwai-Kolors--Kolors/snapshots/master"
    assert not (folder / UNET).exists()  # nothing half-written or unverified at the path a step loads
    for name in ("list_status", "file_status", "drop_file", "wrong_size", "wrong_sha"):
        setattr(hub, name, None if name == "list_status" else type(getattr(hub, name))())
    fetched = len(hub.file_gets)
    assert _models(tmp_path) == 0  # the next run, in this process (the client's default retries)
    refetched = [g for g in hub.file_gets[fetched:] if g[0] == KOLORS_ID]
    if fault != "list 500" and fault != "list 404":
        assert [p for _, p, _ in refetched] == [UNET]  # the finished files are kept
    if fault == "dropped mid-file":
        assert refetched[0][2] > 0  # resumed with a Range request from the partial file


def test_the_offline_hub_switches_are_scoped_to_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    from kolors_lib.core.compat import offline_hubs

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # an earlier test may have left it on
    before = dict(os.environ)
    with offline_hubs():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE
        assert datasets.config.HF_HUB_OFFLINE
    assert dict(os.environ) == before and not hub_constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def _anime_cfg(tiny_cfg):
    tiny_cfg.data.source = "modelscope"
    return tiny_cfg


def test_lowres_anime_is_imported_from_the_hub_once(hub: DownloadHub, tiny_cfg) -> None:
    cfg = _anime_cfg(tiny_cfg)
    result = import_dataset(cfg)
    assert result.count == 6 and result.skipped == []
    rows = read_metadata(cfg.raw_dir)
    assert {r["text"] for r in rows} == {"二次元"} and rows[0]["source"] == f"modelscope:{DATASET_ID}#0"
    assert sorted(hub.fetched(DATASET_ID)) == [f"data/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    before = len(hub.requests)
    assert import_dataset(cfg).count == 6 and len(hub.requests) == before  # the record: no request at all


def test_a_corrupt_parquet_is_reported_skipped_and_fetched_again(hub: DownloadHub, tiny_cfg) -> None:
    cfg = _anime_cfg(tiny_cfg)
    bad = "data/train-00001-of-00002.parquet"
    good = hub.dataset_repos[DATASET_ID][bad]
    hub.add_dataset(DATASET_ID, {**hub.dataset_repos[DATASET_ID], bad: b"PAR1 this is not parquet PAR1"})
    result = import_dataset(cfg)
    assert result.count == 3  # the other file's rows
    [skip] = result.skipped
    assert skip["source"] == f"modelscope:{DATASET_ID}/{bad}" and "not a readable parquet file" in skip["reason"]
    assert json.loads(result.report_path.read_text(encoding="utf-8"))["skipped"] == [skip]
    hub.add_dataset(DATASET_ID, {**hub.dataset_repos[DATASET_ID], bad: good})  # the hub's copy is fixed
    fetched = len(hub.file_gets)
    again = import_dataset(cfg)
    assert again.count == 6 and again.skipped == [] and hub.fetched()[fetched:] == [bad]


def test_a_dataset_download_failure_is_one_data_error(hub: DownloadHub, tiny_cfg) -> None:
    hub.list_status = 404
    with pytest.raises(DataError) as err:
        import_dataset(_anime_cfg(tiny_cfg))
    line = err.value.one_line()
    assert line.startswith(f"cannot download {DATASET_ID}: its file list could not be read") and "404" in line
    assert "python -m kolors_lib data import SRC" in line and err.value.__suppress_context__
