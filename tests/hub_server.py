"""A loopback stand-in for the ModelScope hub, speaking what `modelscope==1.40.2` (modelscope_hub 0.5.1) sends.

Test helper only. It implements the calls `HubApi().login`, `create_repo`, `repo_exists` and
`upload_folder` make (read from modelscope_hub/_legacy_api.py, _openapi.py, api.py, _upload.py):

* ``POST /api/v1/login`` {"AccessToken"} -> legacy envelope with Username/Email/AccessToken and an
  ``m_session_id`` cookie; a bad token gets HTTP 400 + business code 10010103009, as the real site
  answers (the client maps it to AuthenticationError).
* ``GET /openapi/v1/users/me`` (login ends with ``whoami()``) -> ``{"success", "data": {...}}``; 401
  with code ``InvalidAuthentication`` for a bad token.
* ``GET /openapi/v1/models/{owner}/{name}`` and the legacy fallback ``GET /api/v1/models/{owner}/{name}``
  (repo_exists / get_repo) -> 404 for a missing repo or someone else's private one.
* ``POST /api/v1/models`` {"Path", "Name", "Visibility", "License", ...} (create_repo; upload_folder
  calls it again, ignoring errors) -> 400 + code 10010101001 "already exists", 403 outside the
  caller's namespaces.
* ``POST /api/v1/repos/models/{owner}/{name}/info/lfs/objects/batch`` (git-lfs batch: which blobs
  to send, and where) -> an ``upload.href`` on this server for each blob it lacks; 403 without write
  access.
* ``PUT /lfs/{oid}`` (the blob) -> checks size and sha256; can drop the connection mid-body.
* ``POST /api/v1/repos/models/{owner}/{name}/commit/{revision}`` {"commit_message", "actions"} with
  ``normal`` (base64 content) and ``lfs`` (sha256 pointer to an uploaded blob) actions.

Every request is recorded in ``server.requests``; anything else is answered 404 and listed in
``server.unhandled``. Received files are kept in memory: ``server.repos[repo_id].files[path] = bytes``.

Knobs: ``users`` (token -> username), ``orgs`` (username -> namespaces it may write to),
``add_repo(repo_id, owner_user, private)`` for a repo that belongs to someone else, ``drop_puts``
(the next N blob PUTs are cut off after half their body, as a network drop would).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

CODE_TOKEN_INVALID = 10010103009
CODE_MODEL_EXISTS = 10010101001
_REPO = r"(?P<owner>[^/]+)/(?P<name>[^/]+)"


@dataclass
class Repo:
    """One model repository: who created it, its visibility, the committed files and commits."""

    repo_id: str
    owner_user: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


class _Drop(Exception):
    """Raised inside a handler to cut the connection without an answer."""


class HubServer:
    """The hub on 127.0.0.1:<free port>, served from a daemon thread; use as a context manager."""

    def __init__(self, users: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None) -> None:
        self.users = dict(users or {})
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.drop_puts = 0
        self.dropped = 0
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ knobs and views
    def add_repo(self, repo_id: str, owner_user: str, private: bool = False,
                 files: dict[str, bytes] | None = None) -> Repo:
        """Register a repo created by `owner_user` (e.g. someone else's)."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, owner_user, private, dict(files or {}))
            return repo

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files committed to `repo_id` (empty when it does not exist)."""
        with self.lock:
            repo = self.repos.get(repo_id)
            return dict(repo.files) if repo else {}

    def can_write(self, user: str | None, repo_id: str) -> bool:
        if user is None:
            return False
        owner = repo_id.split("/", 1)[0]
        return owner == user or owner in self.orgs.get(user, set())

    def can_see(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or self.can_write(user, repo.repo_id)


def _envelope(data: Any, code: int = 200, message: str = "success") -> dict[str, Any]:
    """The legacy /api/v1 response shape."""
    return {"Code": code, "Data": data, "Message": message, "RequestId": uuid.uuid4().hex,
            "Success": code == 200}


def _openapi(data: Any = None, code: str | None = None, message: str = "") -> dict[str, Any]:
    """The /openapi/v1 response shape."""
    if code is None:
        return {"success": True, "data": data, "request_id": uuid.uuid4().hex}
    return {"success": False, "code": code, "message": message, "request_id": uuid.uuid4().hex}


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
            return

        def handle(self) -> None:
            try:
                super().handle()
            except (OSError, _Drop):
                self.close_connection = True

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass

        # ---------------------------------------------------- plumbing
        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            if token is None:
                match = re.search(r"m_session_id=([^;]+)", self.headers.get("Cookie", ""))
                token = match.group(1) if match else None
            return hub.users.get(token) if token else None

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _json(self) -> Any:
            raw = self._body()
            return json.loads(raw) if raw else {}

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _drop(self) -> None:
            """Reset the connection (SO_LINGER 0: RST), as a network drop would."""
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            finally:
                raise _Drop()

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((method, path))
            for pattern, verb, func in ROUTES:
                match = pattern.fullmatch(path)
                if match and verb == method:
                    func(self, **match.groupdict())
                    return
            self._body()
            with hub.lock:
                hub.unhandled.append((method, path))
            self._send(404, _envelope(None, 404, f"no route {method} {path}"))

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._route("PUT")

        # ---------------------------------------------------- endpoints
        def login(self) -> None:
            token = self._json().get("AccessToken")
            user = hub.users.get(token)
            if user is None:
                self._send(400, _envelope(None, CODE_TOKEN_INVALID, "AccessToken is invalid or expired"))
                return
            data = {"AccessToken": f"git-{uuid.uuid4().hex}", "Username": user, "Email": f"{user}@example.com"}
            self._send(200, _envelope(data), {"Set-Cookie": f"m_session_id={token}; Path=/"})

        def users_me(self) -> None:
            user = self._user()
            if user is None:
                self._send(401, _openapi(code="InvalidAuthentication", message="invalid or missing token"))
                return
            self._send(200, _openapi({"username": user, "email": f"{user}@example.com", "id": user}))

        def _visible(self, owner: str, name: str) -> Repo | None:
            repo = hub.repos.get(f"{owner}/{name}")
            return repo if repo is not None and hub.can_see(self._user(), repo) else None

        def get_model_openapi(self, owner: str, name: str) -> None:
            repo = self._visible(owner, name)
            if repo is None:
                self._send(404, _openapi(code="ResourceNotFound", message="model not found"))
                return
            self._send(200, _openapi({"id": repo.repo_id, "owner": owner, "name": name, "private": repo.private}))

        def get_model_legacy(self, owner: str, name: str) -> None:
            repo = self._visible(owner, name)
            if repo is None:
                self._send(404, _envelope(None, 404, "模型不存在"))
                return
            self._send(200, _envelope({"Path": owner, "Name": name, "Visibility": 1 if repo.private else 5}))

        def create_model(self) -> None:
            body = self._json()
            user = self._user()
            owner, name = str(body.get("Path") or ""), str(body.get("Name") or "")
            repo_id = f"{owner}/{name}"
            if user is None:
                self._send(401, _envelope(None, 401, "用户未登录"))
                return
            if not owner or not name:
                self._send(400, _envelope(None, 400, "Path and Name are required"))
                return
            with hub.lock:
                if repo_id in hub.repos:
                    self._send(400, _envelope(None, CODE_MODEL_EXISTS, "该名称已被注册使用，请重新命名"))
                    return
                if not hub.can_write(user, repo_id):
                    self._send(403, _envelope(None, 403, f"no permission to create models under {owner}"))
                    return
                hub.repos[repo_id] = Repo(repo_id, user, private=int(body.get("Visibility", 5)) == 1)
            self._send(200, _envelope({"Path": owner, "Name": name}))

        def _writable(self, owner: str, name: str) -> Repo | None:
            """The repo when the caller may write to it; otherwise answer 401/403/404 and return None."""
            user = self._user()
            repo = hub.repos.get(f"{owner}/{name}")
            if user is None:
                self._send(401, _envelope(None, 401, "用户未登录"))
            elif repo is None or not hub.can_see(user, repo):
                self._send(404, _envelope(None, 404, "模型不存在"))
            elif not hub.can_write(user, repo.repo_id):
                self._send(403, _envelope(None, 403, "permission denied: you cannot write to this repository"))
            else:
                return repo
            return None

        def lfs_batch(self, owner: str, name: str) -> None:
            body = self._json()
            if self._writable(owner, name) is None:
                return
            objects = []
            for obj in body.get("objects", []):
                oid, size = str(obj.get("oid")), int(obj.get("size", 0))
                entry: dict[str, Any] = {"oid": oid, "size": size}
                with hub.lock:
                    have = oid in hub.blobs
                if not have:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs/{oid}", "expires_in": 3600}}
                objects.append(entry)
            self._send(200, _envelope({"transfer": "basic", "objects": objects}))

        def lfs_put(self, oid: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            with hub.lock:
                drop = hub.drop_puts > 0
                if drop:
                    hub.drop_puts -= 1
                    hub.dropped += 1
            if drop:
                self.rfile.read(length // 2)
                self._drop()
            data = self.rfile.read(length)
            if self._user() is None:
                self._send(401, _envelope(None, 401, "用户未登录"))
                return
            if hashlib.sha256(data).hexdigest() != oid:
                self._send(400, _envelope(None, 400, "sha256 mismatch"))
                return
            with hub.lock:
                hub.blobs[oid] = data
            self._send(200, _envelope(None))

        def commit(self, owner: str, name: str, revision: str) -> None:
            body = self._json()
            repo = self._writable(owner, name)
            if repo is None:
                return
            staged: dict[str, bytes | None] = {}
            for action in body.get("actions", []):
                path, kind = action.get("path"), action.get("action")
                if kind == "delete":
                    staged[path] = None
                    continue
                if action.get("type") == "lfs":
                    with hub.lock:
                        data = hub.blobs.get(action.get("sha256"))
                    if data is None or len(data) != int(action.get("size", -1)):
                        self._send(400, _envelope(None, 400, f"lfs object of {path} was not uploaded"))
                        return
                else:
                    data = base64.b64decode(action.get("content") or "")
                    if len(data) != int(action.get("size", len(data))):
                        self._send(400, _envelope(None, 400, f"size mismatch for {path}"))
                        return
                staged[path] = data
            commit_id = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
            with hub.lock:
                for path, data in staged.items():
                    if data is None:
                        repo.files.pop(path, None)
                    else:
                        repo.files[path] = data
                record = {"commit_id": commit_id, "revision": revision, "message": body.get("commit_message"),
                          "paths": sorted(staged)}
                repo.commits.append(record)
            self._send(200, _envelope({"CommitId": commit_id, "Revision": revision,
                                       "CommitMessage": body.get("commit_message"), "Files": sorted(staged)}))

    ROUTES = [
        (re.compile(r"/api/v1/login"), "POST", Handler.login),
        (re.compile(r"/openapi/v1/users/me"), "GET", Handler.users_me),
        (re.compile(rf"/openapi/v1/models/{_REPO}"), "GET", Handler.get_model_openapi),
        (re.compile(rf"/api/v1/models/{_REPO}"), "GET", Handler.get_model_legacy),
        (re.compile(r"/api/v1/models"), "POST", Handler.create_model),
        (re.compile(rf"/api/v1/repos/models/{_REPO}/info/lfs/objects/batch"), "POST", Handler.lfs_batch),
        (re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})"), "PUT", Handler.lfs_put),
        (re.compile(rf"/api/v1/repos/models/{_REPO}/commit/(?P<revision>[^/]+)"), "POST", Handler.commit),
    ]
    return Handler
