"""Downloads from ModelScope: only the files the course loads, a record of what arrived, one-line errors.

A repo is fetched with modelscope's own `snapshot_download`, which checks every file against the size
and sha256 of the hub's file list and resumes a partial file (`.incomplete`) with a Range request. What
it delivered is then recorded in `.course-download.json` beside the files (path, size and sha256 from
the hub's list), so a later run finds a complete copy by file sizes alone: no network, and no re-hashing
of 16 GB, which the client would do on every call. A folder without that record (placed by hand, or an
older download) is used when the hub is out of reach and the caller says it is complete.
"""

from __future__ import annotations

import glob
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from kolors_lib.core.console import console_stream, progress
from kolors_lib.core.errors import DownloadError
from kolors_lib.core.files import write_json
from kolors_lib.core.hub import hub_endpoint, hub_reachable

MANIFEST = ".course-download.json"
REVISION = "master"
# an allow-list entry: a glob, or a tuple of alternatives of which the first the hub has is taken
Pattern = str | tuple[str, ...]
RETRY = "Run the same command again (finished files are kept, a partial file resumes)"


@dataclass(frozen=True)
class RepoFile:
    """One file of a hub repo, as its file list gives it."""

    path: str
    size: int
    sha256: str | None


def repo_folders(cache_dir: str | Path, repo_id: str, repo_type: str = "model") -> list[Path]:
    """Where modelscope 1.40.2 keeps a repo: its own layout first, then the older ones it still reuses."""
    owner, name = repo_id.split("/", 1)
    base, kind = Path(cache_dir), f"{repo_type}s"
    return [base / kind / f"{owner}--{name}" / "snapshots" / REVISION, base / kind / owner / name.replace(".", "___"),
            base / owner / name]


def _patterns_key(patterns: Sequence[Pattern]) -> list[Any]:
    return [list(p) if isinstance(p, tuple) else p for p in patterns]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The download record of `folder`, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _sizes_match(folder: Path, files: dict[str, Any]) -> bool:
    for rel, entry in files.items():
        try:
            if (folder / rel).stat().st_size != int(entry["size"]):
                return False
        except (OSError, KeyError, TypeError, ValueError):
            return False
    return True


def recorded_copy(cache_dir: str | Path, repo_id: str, patterns: Sequence[Pattern],
                  repo_type: str = "model") -> Path | None:
    """A folder whose record says it holds every file of `patterns`, each still at its recorded size."""
    for folder in repo_folders(cache_dir, repo_id, repo_type):
        record = read_manifest(folder)
        if (record and record.get("complete") and record.get("patterns") == _patterns_key(patterns)
                and _sizes_match(folder, record["files"])):
            return folder
    return None


def unrecorded_copy(cache_dir: str | Path, repo_id: str, complete: Callable[[Path], bool] | None,
                    repo_type: str = "model") -> Path | None:
    """A folder without a download record that `complete` accepts (a copy placed by hand, an older download).

    A folder whose record says its download stopped half-way is never taken."""
    if complete is None:
        return None
    for folder in repo_folders(cache_dir, repo_id, repo_type):
        if folder.is_dir() and read_manifest(folder) is None and complete(folder):
            return folder
    return None


def select(files: Sequence[RepoFile], patterns: Sequence[Pattern]) -> list[RepoFile]:
    """The files the allow list takes, in the hub's order; a tuple entry takes its first alternative the hub has."""
    chosen: list[str] = []
    for entry in patterns:
        for alternative in (entry if isinstance(entry, tuple) else (entry,)):
            hits = [f.path for f in files if fnmatchcase(f.path, alternative)]
            if hits:
                chosen.extend(hits)
                break
    wanted = set(chosen)
    return [f for f in files if f.path in wanted]


def list_files(repo_id: str, repo_type: str = "model") -> list[RepoFile]:
    """The hub's file list of `repo_id` (one request for a model; pages for a dataset)."""
    from modelscope_hub import HubApi

    api = HubApi(endpoint=hub_endpoint())
    infos = api.list_repo_files(repo_id, repo_type, revision=REVISION, recursive=True)
    return [RepoFile(i.path, int(i.size or 0), i.sha256) for i in infos if not i.is_dir]


def human_size(size: float) -> str:
    """Bytes as a short human size (1024-based: what file managers show)."""
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def cause_of(err: BaseException) -> str:
    """What went wrong, in a few words, for a modelscope_hub / requests exception."""
    from modelscope_hub.errors import FileIntegrityError, FileSizeMismatchError, NetworkError

    status = getattr(err, "status_code", None) or getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, FileSizeMismatchError):
        return "its size differs from the hub's file list (the copy on the hub is truncated or out of date)"
    if isinstance(err, FileIntegrityError):
        return "its sha256 differs from the hub's file list (damaged in transfer or on the hub)"
    if status == 404:
        return "the hub answered 404 (not found)"
    if status:
        return f"the hub answered HTTP {status}" + (" (a server error)" if int(status) >= 500 else "")
    if isinstance(err, (NetworkError, ConnectionError, TimeoutError)):
        return "the connection to the hub failed or timed out"
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 200 else text[:199] + "…"


class _Bars:
    """The bars of one download: one per file, and the total in bytes with the time left."""

    def __init__(self, label: str, total: int) -> None:
        self.lock = threading.Lock()
        self.total = progress(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{label} (total)")

    def advance(self, size: int) -> None:
        with self.lock:
            self.total.update(size)

    def callback(self) -> type:
        """A modelscope ProgressCallback class whose instances (one per file) draw that file's bar."""
        from modelscope_hub import ProgressCallback

        bars = self

        class FileBar(ProgressCallback):
            def __init__(self, filename: str, file_size: int) -> None:
                super().__init__(filename, file_size)
                self.bar = progress(total=file_size or None, unit="B", unit_scale=True, unit_divisor=1024,
                                    desc=filename)

            def update(self, size: int) -> None:
                self.bar.update(size)
                bars.advance(size)

            def end(self) -> None:
                self.bar.close()

        return FileBar

    def close(self) -> None:
        self.total.close()


def _record(folder: Path, repo_id: str, patterns: Sequence[Pattern], wanted: list[RepoFile],
            failed: set[str]) -> bool:
    """Write the download record of `folder`: the files that arrived at their listed size; True when all did."""
    files = {}
    for f in wanted:
        path = folder / f.path
        if f.path not in failed and path.is_file() and path.stat().st_size == f.size:
            files[f.path] = {"size": f.size, "sha256": f.sha256}
    complete = len(files) == len(wanted)
    write_json({"repo": repo_id, "revision": REVISION, "patterns": _patterns_key(patterns), "complete": complete,
                "files": files}, folder / MANIFEST)
    return complete


def _target_folder(cache_dir: Path, repo_id: str, repo_type: str) -> Path:
    """The folder the client will write to: an older layout it reuses when that is not empty, else its own."""
    own, *older = repo_folders(cache_dir, repo_id, repo_type)
    if own.is_dir() and any(own.iterdir()):
        return own
    return next((f for f in older if f.is_dir() and any(f.iterdir())), own)


def _to_fetch(folder: Path, wanted: list[RepoFile]) -> list[RepoFile]:
    """The wanted files that the folder's record does not already vouch for (same sha256, same size on disk)."""
    record = (read_manifest(folder) or {}).get("files", {})
    todo = []
    for f in wanted:
        entry = record.get(f.path)
        have = (isinstance(entry, dict) and entry.get("sha256") == f.sha256 and entry.get("size") == f.size
                and _sizes_match(folder, {f.path: entry}))
        if not have:
            todo.append(f)
    return todo


def hub_listing(repo_id: str, patterns: Sequence[Pattern], hint: str, repo_type: str = "model") -> list[RepoFile]:
    """The files `patterns` take from the hub's file list of `repo_id`; a DownloadError when the hub cannot say."""
    if not hub_reachable():
        raise DownloadError(f"cannot download {repo_id}: ModelScope ({hub_endpoint()}) is not reachable from this "
                            f"machine. Run again once it is, or {hint}")
    try:
        wanted = select(list_files(repo_id, repo_type), patterns)
    except Exception as err:  # modelscope_hub's errors are not OSErrors: any of them means "no file list"
        raise DownloadError(f"cannot download {repo_id}: its file list could not be read from {hub_endpoint()}: "
                            f"{cause_of(err)}. Run again later, or {hint}") from None
    if not wanted:
        raise DownloadError(f"cannot download {repo_id}: the hub lists none of the files the course needs "
                            f"({', '.join(map(str, _patterns_key(patterns)))}); {hint}")
    return wanted


def fetch_repo(repo_id: str, cache_dir: str | Path, patterns: Sequence[Pattern], hint: str,
               repo_type: str = "model", complete: Callable[[Path], bool] | None = None) -> Path:
    """The local folder of `repo_id` holding the files `patterns` take, downloading what is missing.

    A recorded complete copy is returned without the network; an unrecorded one that `complete` accepts is
    returned when the hub cannot be reached. `hint` says what else the learner can do (a local folder).
    Every failure is a DownloadError naming the repo (and file), the cause and what to do."""
    cache_dir = Path(cache_dir)
    found = recorded_copy(cache_dir, repo_id, patterns, repo_type)
    if found is not None:
        return found
    fallback = unrecorded_copy(cache_dir, repo_id, complete, repo_type)
    try:
        wanted = hub_listing(repo_id, patterns, hint, repo_type)
    except DownloadError:
        if fallback is not None:
            return fallback
        raise
    return _download(repo_id, cache_dir, patterns, wanted, hint, repo_type)


def _download(repo_id: str, cache_dir: Path, patterns: Sequence[Pattern], wanted: list[RepoFile], hint: str,
              repo_type: str) -> Path:
    """Fetch the wanted files the record does not vouch for, with bars; record what arrived."""
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub.errors import FileDownloadError

    folder = _target_folder(cache_dir, repo_id, repo_type)
    todo = _to_fetch(folder, wanted) if folder.is_dir() else list(wanted)
    failed: set[str] = set()
    if todo:
        print(f"downloading {len(todo)} file(s) of {repo_id}, {human_size(sum(f.size for f in todo))}",
              file=console_stream(), flush=True)  # beside the bars; stdout stays the command's result
        bars = _Bars(repo_id, sum(f.size for f in todo))
        exact = [glob.escape(f.path) for f in todo]
        try:
            folder = Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, cache_dir=str(cache_dir),
                                            allow_patterns=exact, progress_callbacks=[bars.callback()],
                                            endpoint=hub_endpoint()))
        except FileDownloadError as err:
            failed = set(err.failed_files or {}) or {f.path for f in todo}
            folder = Path(getattr(err, "output_dir", None) or folder)
            _record(folder, repo_id, patterns, wanted, failed)
            path = sorted(failed)[0]
            more = f" (and {len(failed) - 1} more file(s))" if len(failed) > 1 else ""
            raise DownloadError(f"cannot download {repo_id}: file {path}{more} failed: "
                                f"{cause_of((err.failed_files or {}).get(path, err))}. {RETRY}; "
                                f"or {hint}") from None
        except Exception as err:
            raise DownloadError(f"cannot download {repo_id}: {cause_of(err)}. {RETRY}; "
                                f"or {hint}") from None
        finally:
            bars.close()
    if not _record(folder, repo_id, patterns, wanted, failed):
        raise DownloadError(f"cannot download {repo_id}: some files did not arrive whole in {folder}. "
                            f"{RETRY}; or {hint}")
    return folder
