"""The download side of the loopback ModelScope hub, as `modelscope==1.40.2` (modelscope_hub 0.5.1) reads it.

Test helper only. `DownloadHub` is the upload hub of tests/hub_server.py (one server, one port) plus the
calls `snapshot_download`, `dataset_snapshot_download` and `HubApi().get_model_files` make, read from
modelscope_hub/_download.py (DownloadManager.download_repo, _download_file, _download_with_resume) and
modelscope_hub/_legacy_api.py (list_repo_files, list_dataset_files_paginated, download_stream):

* ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=True[&Root=dir]`` -> legacy envelope
  ``{"Data": {"Files": [{"Name", "Path", "Type": "blob"|"tree", "Size", "Sha256", ...}]}}``; the client
  lists one ``Root`` per literal directory of its allow patterns, so ``Root`` filters.
* ``GET /api/v1/datasets/{owner}/{name}/repo/tree?Revision=&Recursive=True&PageNumber=&PageSize=`` -> the
  same entries, one page at a time (a page shorter than PageSize ends the listing).
* ``GET /api/v1/datasets/{owner}/{name}`` -> dataset meta (numeric ``Id``).
* ``GET /api/v1/{models|datasets}/{owner}/{name}/repo?Revision=&FilePath=`` -> the file; a ``Range:
  bytes=N-`` header gets ``206`` with ``Content-Range`` (how the client resumes its ``.incomplete`` file).
  The client checks the body against the listing's Size and Sha256.
* ``GET /api/v1/repos/internalAccelerationInfo`` is left unanswered (404), as off Alibaba Cloud.

A repo's files are `Served` entries: real bytes, or a *filler* (a size and hash the listing claims,
never served: a request for one is recorded in ``filler_requests`` and answered 410), so a repo can
list the 10 GB files a course must never fetch without holding them.

Fault switches (plain attributes; counts go down as they fire):
``list_status`` (status for every listing: 404, 500), ``file_status[path]`` (status for one file),
``drop_file[path]`` (cut the connection after half the body, that many times), ``wrong_size`` (paths whose
listing Size is off by 7 bytes), ``wrong_sha`` (paths whose listing Sha256 is wrong). A corrupt parquet is
just bytes that are not parquet: `add_dataset(..., {"data/x.parquet": b"junk"})`.
``file_gets`` records (repo_id, path, first byte asked) for every file request.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from hub_server import HubServer, _envelope

_REPO = r"(?P<owner>[^/]+)/(?P<name>[^/]+)"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Served:
    """One file of a served repo: its bytes, or a filler that only claims a size and a hash."""

    data: bytes | None
    size: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> Served:
        """A real file."""
        return cls(data, len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def filler(cls, size: int, name: str = "") -> Served:
        """A file listed with `size` bytes that is never served."""
        return cls(None, size, hashlib.sha256(f"filler:{name}:{size}".encode()).hexdigest())


class DownloadHub(HubServer):
    """The loopback hub, upload side and download side, on one port; use as a context manager."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_repos: dict[str, dict[str, Served]] = {}
        self.dataset_repos: dict[str, dict[str, Served]] = {}
        self.list_status: int | None = None
        self.file_status: dict[str, int] = {}
        self.drop_file: dict[str, int] = {}
        self.wrong_size: set[str] = set()
        self.wrong_sha: set[str] = set()
        self.file_gets: list[tuple[str, str, int]] = []
        self.filler_requests: list[str] = []
        self._httpd.RequestHandlerClass = _download_handler(self, self._httpd.RequestHandlerClass)

    def add_model(self, repo_id: str, files: dict[str, bytes | Served]) -> None:
        """Serve model `repo_id` with `files` (path -> bytes or Served)."""
        self.model_repos[repo_id] = {p: v if isinstance(v, Served) else Served.of(v) for p, v in files.items()}

    def add_dataset(self, repo_id: str, files: dict[str, bytes | Served]) -> None:
        """Serve dataset `repo_id` with `files` (path -> bytes or Served)."""
        self.dataset_repos[repo_id] = {p: v if isinstance(v, Served) else Served.of(v) for p, v in files.items()}

    def fetched(self, repo_id: str | None = None) -> list[str]:
        """The paths whose bytes were asked for (of `repo_id`, or all), in order."""
        return [p for r, p, _ in self.file_gets if repo_id in (None, r)]

    def listing(self, files: dict[str, Served], root: str | None) -> list[dict[str, Any]]:
        """The entries the hub lists: every file under `root`, and the folders on the way."""
        root = (root or "").strip("/")
        entries: dict[str, dict[str, Any]] = {}
        for path, served in sorted(files.items()):
            if root and not path.startswith(root + "/"):
                continue
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                entries.setdefault(folder, {"Name": parts[depth - 1], "Path": folder, "Type": "tree", "Size": 0})
            size = served.size + (7 if path in self.wrong_size else 0)
            sha = "0" * 64 if path in self.wrong_sha else served.sha256
            entries[path] = {"Name": parts[-1], "Path": path, "Type": "blob", "Size": size, "Sha256": sha,
                             "Revision": "master", "IsLFS": size > 10_000_000, "CommittedDate": 1720000000}
        return list(entries.values())


def _download_handler(hub: DownloadHub, base: type[BaseHTTPRequestHandler]) -> type[BaseHTTPRequestHandler]:
    class Handler(base):  # type: ignore[valid-type, misc]
        def _route(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), {k: v[-1] for k, v in parse_qs(parts.query).items()}
            for pattern, verb, func in DOWNLOAD_ROUTES:
                match = pattern.fullmatch(path)
                if match and verb == method:
                    with hub.lock:
                        hub.requests.append((method, path))
                    func(self, query=query, **match.groupdict())
                    return
            super()._route(method)

        def do_HEAD(self) -> None:  # noqa: N802
            self._route("HEAD")

        def _repo(self, kind: str, owner: str, name: str) -> dict[str, Served] | None:
            repos = hub.model_repos if kind == "models" else hub.dataset_repos
            files = repos.get(f"{owner}/{name}")
            if files is None:
                self._send(404, _envelope(None, 404, "模型不存在" if kind == "models" else "数据集不存在"))
            return files

        def list_model(self, query: dict[str, str], owner: str, name: str) -> None:
            if hub.list_status is not None:
                self._send(hub.list_status, _envelope(None, hub.list_status, "file list unavailable"))
                return
            files = self._repo("models", owner, name)
            if files is not None:
                self._send(200, _envelope({"Files": hub.listing(files, query.get("Root")), "IsVisual": 0}))

        def list_dataset(self, query: dict[str, str], owner: str, name: str) -> None:
            if hub.list_status is not None:
                self._send(hub.list_status, _envelope(None, hub.list_status, "file list unavailable"))
                return
            files = self._repo("datasets", owner, name)
            if files is None:
                return
            entries = hub.listing(files, query.get("Root"))
            size, page = int(query.get("PageSize", 100)), int(query.get("PageNumber", 1))
            self._send(200, _envelope({"Files": entries[(page - 1) * size:page * size]}))

        def dataset_meta(self, query: dict[str, str], owner: str, name: str) -> None:
            if self._repo("datasets", owner, name) is not None:
                number = sorted(hub.dataset_repos).index(f"{owner}/{name}") + 1
                self._send(200, _envelope({"Id": number, "Name": name, "Namespace": owner, "Type": 0}))

        def get_file(self, query: dict[str, str], kind: str, owner: str, name: str) -> None:
            files = self._repo(kind, owner, name)
            if files is None:
                return
            path = query.get("FilePath", "").lstrip("/")
            match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
            start = int(match.group(1)) if match else 0
            with hub.lock:
                hub.file_gets.append((f"{owner}/{name}", path, start))
                status = hub.file_status.get(path)
                drop = hub.drop_file.get(path, 0) > 0
                if drop:
                    hub.drop_file[path] -= 1
            served = files.get(path)
            if status is not None or served is None or served.data is None:
                if served is not None and served.data is None:
                    hub.filler_requests.append(path)
                code = status or (404 if served is None else 410)
                self._send(code, _envelope(None, code, f"cannot serve {path}"))
                return
            body = served.data[start:]
            self.send_response(206 if match else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if match:
                self.send_header("Content-Range", f"bytes {start}-{len(served.data) - 1}/{len(served.data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if drop:
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self._drop()
            self.wfile.write(body)

    DOWNLOAD_ROUTES = [
        (re.compile(rf"/api/v1/models/{_REPO}/repo/files"), "GET", Handler.list_model),
        (re.compile(rf"/api/v1/datasets/{_REPO}/repo/tree"), "GET", Handler.list_dataset),
        (re.compile(rf"/api/v1/datasets/{_REPO}"), "GET", Handler.dataset_meta),
        (re.compile(rf"/api/v1/(?P<kind>models|datasets)/{_REPO}/repo"), "GET", Handler.get_file),
        (re.compile(rf"/api/v1/(?P<kind>models|datasets)/{_REPO}/repo"), "HEAD", Handler.get_file),
    ]
    return Handler
