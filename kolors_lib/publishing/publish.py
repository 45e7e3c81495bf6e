"""Step 06: assemble the model repo folder (LoRA in 3 namings, model card, samples) and publish it to ModelScope.

* :func:`assemble` builds ``<workdir>/publish`` from the outputs of steps 03-05, atomically (a temp
  folder swapped in), byte-identical on a re-run; the sources are only read. The diffusers and kohya
  files are always re-exported from ``lora/kolors_lora.safetensors``, so they can never be stale.
  ``manifest.json`` is the storyboard manifest with local paths replaced by repo paths.
* :func:`plan` lists what an upload sends (repo path, size); :func:`publish` is a **dry run by
  default**: it assembles and reports the plan, and sends nothing.
* A real upload (``dry_run=False``) reads the token from the environment variable
  ``MODELSCOPE_API_TOKEN`` (the ``token`` argument exists for library callers only; the CLI and the
  notebook never take a token as an argument). The token is never printed, logged, or put in an
  exception message. Like ``modelscope login``, the modelscope client stores its session under
  ``~/.modelscope/credentials`` (``$MODELSCOPE_HOME``). The upload uses ``use_cache=False``, so a
  re-upload after a change is never skipped and the publish folder gets no ``.ms_upload_cache``.
  A failed upload leaves every local file as it was; running the same command again retries.
* CLI: ``python -m kolors_lib publish --workdir W --repo-id OWNER/NAME [--dry-run] [--private]``.
  On the command line, leaving out ``--dry-run`` means "upload": it then needs
  ``MODELSCOPE_API_TOKEN`` and exits 2 with an explanation when it is not set.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kolors_lib.core.config import GRID_FILE, MANIFEST_FILE, NAME_HINT, PROJECT_ROOT, Config
from kolors_lib.core.console import logged_step
from kolors_lib.core.errors import LoraError, PublishError
from kolors_lib.core.files import staged_folder
from kolors_lib.core.lock import one_writer
from kolors_lib.publishing.model_card import (
    EXPORTS,
    LORA_NAME,
    TASK,
    model_card,
    model_url,
    prompts_text,
    public_manifest,
)

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
TOKEN_PAGE = "https://modelscope.cn/my/myaccesstoken"
# files the modelscope client never uploads (its DEFAULT_IGNORE_PATTERNS and its own cache files)
_IGNORED_NAMES = {".ms_upload_cache", ".ms_upload_progress"}
_IGNORED_DIRS = {".git", ".cache"}
_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME = re.compile(r"[^\W_][\w.-]{0,127}")


# ---------------------------------------------------------------- repo id


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` (stripped) if it is `OWNER/NAME`, else raise PublishError with the naming hint."""
    text = (repo_id or "").strip()
    owner, sep, name = text.partition("/")
    if not sep or not _OWNER.fullmatch(owner) or not _NAME.fullmatch(name) or name.endswith("."):
        raise PublishError(
            f"repo id {repo_id!r} is not OWNER/NAME: OWNER is your ModelScope user name (or an organisation), NAME "
            f"has letters, digits, CJK, '-', '_' or '.', no spaces or slashes; the challenge asks for names like "
            f"your-user/{NAME_HINT}")
    return text


# ---------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    lora: Path
    panels: list[Path]
    grid: Path
    manifest: dict[str, Any]
    scores: dict[str, Any] | None


def _read_json(path: Path, step: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PublishError(f"{path}: cannot read it ({err}); re-run {step}") from None
    if not isinstance(data, dict):
        raise PublishError(f"{path}: expected a JSON object; re-run {step}")
    return data


def _check_inputs(cfg: Config) -> _Inputs:
    from kolors_lib.core.files import sha256_file

    step3 = f"step 03 (python -m kolors_lib train --workdir {cfg.workdir})"
    step4 = f"step 04 (python -m kolors_lib storyboard --workdir {cfg.workdir})"
    lora = cfg.lora_path
    if not lora.is_file():
        raise PublishError(f"the trained LoRA {lora} is missing: run {step3} first")
    story, grid, manifest_path = cfg.storyboard_dir, cfg.grid_path, cfg.manifest_path
    if not manifest_path.is_file():
        missing = [p.name for p in (grid, manifest_path) if not p.is_file()]
        raise PublishError(f"storyboard files missing in {story}: {', '.join(missing)}; run {step4} first")
    manifest = _read_json(manifest_path, step4)
    rows = manifest.get("panels")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise PublishError(f"{manifest_path}: expected a list of panels with prompts; re-run {step4}")
    panels = cfg.panel_paths_for(len(rows))  # as many as the story had scenes (the challenge's: 8)
    missing = [p.name for p in [*panels, grid] if not p.is_file()]
    if missing:
        raise PublishError(f"storyboard files missing in {story}: {', '.join(missing)}; run {step4} first")
    recorded = (manifest.get("lora") or {}).get("sha256")
    if recorded and recorded != sha256_file(lora):
        raise PublishError(f"the storyboard in {story} was rendered with another LoRA than {lora} (sha256 differs): "
                           f"re-run {step4} and step 05 with the current LoRA")
    return _Inputs(lora, panels, grid, manifest, _scores(cfg))


def _scores(cfg: Config) -> dict[str, Any] | None:
    """Step 05's report, or None with a notice: scoring is optional for a submission (the card says so)."""
    from kolors_lib.core.console import show

    step5 = f"step 05 (python -m kolors_lib score --workdir {cfg.workdir})"
    if not cfg.scores_json.is_file():
        show(f"NOTICE: no score report ({cfg.scores_json}): publishing unscored; run {step5} first to add scores")
        return None
    return _read_json(cfg.scores_json, step5)


# ---------------------------------------------------------------- assemble


def _same_lora(a: Path, b: Path) -> bool:
    """Whether two LoRA files hold the same tensors and metadata (safetensors key order varies between writes)."""
    import torch

    from kolors_lib.kolors.lora import load_lora

    try:
        (sa, ma), (sb, mb) = load_lora(a), load_lora(b)
    except (LoraError, OSError):
        return False
    return ma == mb and sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _export(lora: Path, stage: Path, previous: Path) -> tuple[dict[str, Any], int, float]:
    """Copy the LoRA and write its diffusers/kohya exports into `stage`; returns (metadata, rank, alpha).

    An export equal in content to the one in `previous` (the last publish folder) keeps its bytes, so a
    re-run is byte-identical and an upload does not send unchanged blobs again."""
    from kolors_lib.kolors.lora import convert_lora, load_lora, save_lora

    try:
        state, meta = load_lora(lora)
        shutil.copyfile(lora, stage / LORA_NAME)
        rank, alpha = None, None
        for fmt, name in EXPORTS.items():
            out, out_meta = convert_lora(state, fmt, meta)
            out_meta.setdefault("source_file", lora.name)
            save_lora(out, stage / name, out_meta)
            if (previous / name).is_file() and _same_lora(stage / name, previous / name):
                shutil.copyfile(previous / name, stage / name)
            rank, alpha = int(out_meta["rank"]), float(out_meta["alpha"])
    except LoraError as err:
        raise PublishError(f"cannot export {lora}: {err}") from None
    return meta, rank, alpha


COMFYUI_NODE = PROJECT_ROOT / "comfyui" / "kolors_story_lora"


def _add_comfyui(cfg: Config, stage: Path) -> None:
    """The ComfyUI workflow of scene 1 with our LoRA, and the custom node that loads it."""
    from kolors_lib.publishing.comfyui import write_workflow

    write_workflow(cfg, stage / EXPORTS["diffusers"], stage / "comfyui" / "kolors_story_workflow.json")
    if COMFYUI_NODE.is_dir():  # a source checkout; the node folder is not part of the wheel
        shutil.copytree(COMFYUI_NODE, stage / "comfyui" / COMFYUI_NODE.name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@logged_step("06_publish")
def assemble(cfg: Config, repo_id: str) -> Path:
    """Build `cfg.publish_dir` (the folder uploaded as model repo `repo_id`) and return it."""
    repo_id = validate_repo_id(repo_id)
    inputs = _check_inputs(cfg)
    dest = cfg.publish_dir
    with staged_folder(dest) as stage:
        meta, rank, alpha = _export(inputs.lora, stage, dest)
        samples = stage / "samples"
        samples.mkdir()
        for panel in inputs.panels:
            shutil.copyfile(panel, samples / panel.name)
        shutil.copyfile(inputs.grid, samples / GRID_FILE)
        files = {
            "README.md": model_card(repo_id, inputs.manifest, inputs.scores, meta, rank, alpha),
            MANIFEST_FILE: json.dumps(public_manifest(inputs.manifest), indent=2, ensure_ascii=False) + "\n",
            "prompts.txt": prompts_text(inputs.manifest),
            "configuration.json": json.dumps({"framework": "pytorch", "task": TASK}, indent=2) + "\n",
        }
        for name, text in files.items():
            (stage / name).write_text(text, encoding="utf-8")
        _add_comfyui(cfg, stage)
    return dest


def files_to_upload(folder: str | Path) -> list[tuple[str, int]]:
    """The files an upload of `folder` sends: (path in the repo, size in bytes), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} does not exist: assemble it first (python -m kolors_lib publish --dry-run)")
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.name not in _IGNORED_NAMES and not _IGNORED_DIRS.intersection(rel.parts[:-1]):
            out.append((rel.as_posix(), path.stat().st_size))
    return sorted(out)


# ---------------------------------------------------------------- publish


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class PublishResult:
    """What was (or, in a dry run, would be) uploaded, and where."""

    repo_id: str
    folder: Path
    files: list[tuple[str, int]]
    dry_run: bool
    url: str
    created: bool | None = None
    commit: Any = None
    user: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        if self.dry_run:
            head = (f"DRY RUN: nothing uploaded. Would upload {len(self.files)} files "
                    f"({_size(self.total_bytes)}) from {self.folder} to {self.repo_id} ({self.url}):")
        else:
            how = "created" if self.created else "existing repo"
            head = (f"uploaded {len(self.files)} files ({_size(self.total_bytes)}) from {self.folder} to "
                    f"{self.repo_id} ({how}): {self.url}")
        width = max((len(p) for p, _ in self.files), default=0)
        rows = [f"  {p:<{width}}  {_size(s):>10}" for p, s in self.files]
        tail = [] if not self.dry_run else [
            f"to upload: set {TOKEN_ENV} (a token with write permission from {TOKEN_PAGE}) and run again without "
            "--dry-run (library: publish(..., dry_run=False))"]
        return "\n".join([head, *rows, *tail])


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _headline(err: BaseException, token: str) -> str:
    """The first line of a modelscope error, token removed."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return _redact(str(text).strip().splitlines()[0] if str(text).strip() else type(err).__name__, token)


def _hub_errors() -> dict[str, type[BaseException]]:
    from modelscope_hub import errors

    return {name: getattr(errors, name) for name in (
        "HubError", "AuthenticationError", "PermissionDeniedError", "AlreadyExistsError", "NotExistError",
        "NetworkError")}


def _login(api: Any, token: str, endpoint: str, errs: dict[str, type[BaseException]]) -> str | None:
    try:
        api.login(token)
    except (errs["AuthenticationError"], errs["PermissionDeniedError"]):
        raise PublishError(f"ModelScope rejected the token in {TOKEN_ENV} (invalid, expired, or for the other "
                           f"ModelScope site): create a token with write permission at {TOKEN_PAGE}, set "
                           f"{TOKEN_ENV} to it and run again") from None
    except errs["NetworkError"] as err:
        raise PublishError(f"cannot reach ModelScope at {endpoint} ({_headline(err, token)}): check the network "
                           "and run again; nothing was uploaded") from None
    except (errs["HubError"], ValueError, OSError) as err:
        raise PublishError(f"ModelScope login failed: {_headline(err, token)}") from None
    try:
        return api.whoami().username
    except Exception:  # noqa: BLE001 - the user name only improves messages
        return None


def _ensure_repo(api: Any, repo_id: str, private: bool, user: str | None, lfs_probe: dict[str, Any],
                 token: str, errs: dict[str, type[BaseException]]) -> bool:
    """Create `repo_id` if missing; True when created. Raises PublishError when it is not ours to write."""
    owner = repo_id.split("/", 1)[0]
    who = f"you ({user})" if user else "your account"
    try:
        api.create_repo(repo_id, visibility="private" if private else "public", license="apache-2.0")
        return True
    except errs["AlreadyExistsError"]:
        pass
    except (errs["PermissionDeniedError"], errs["AuthenticationError"]):
        raise PublishError(f"cannot create {repo_id}: {who} may not create models under {owner!r}; use your own "
                           f"user name (or an organisation you belong to) as OWNER") from None
    except errs["HubError"] as err:
        raise PublishError(f"cannot create {repo_id}: {_headline(err, token)}") from None
    # it exists: make sure we may write to it before uploading anything (one git-lfs batch request)
    try:
        api.legacy.validate_blobs(repo_id=repo_id, repo_type="model", objects=[lfs_probe])
    except AttributeError:  # an older client without the legacy accessor: the upload will tell
        return False
    except (errs["PermissionDeniedError"], errs["AuthenticationError"], errs["NotExistError"]):
        raise PublishError(f"the name {repo_id} is taken by someone else (or is not writable by {who}): choose "
                           f"another NAME, e.g. {owner}/{NAME_HINT}") from None
    except errs["HubError"] as err:
        raise PublishError(f"cannot check write access to {repo_id}: {_headline(err, token)}") from None
    return False


def _upload(repo_id: str, folder: Path, files: list[tuple[str, int]], token: str, private: bool,
            commit_message: str | None) -> PublishResult:
    from kolors_lib.core.files import sha256_file
    from kolors_lib.core.hub import hub_endpoint

    endpoint = hub_endpoint()
    errs = _hub_errors()
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=endpoint, token=token)
    user = _login(api, token, endpoint, errs)
    lora = folder / LORA_NAME
    created = _ensure_repo(api, repo_id, private, user,
                           {"oid": sha256_file(lora), "size": lora.stat().st_size}, token, errs)
    count = sum(p.startswith("samples/panel_") for p, _ in files)
    message = commit_message or f"Kolors LoRA, model card and {count} storyboard samples ({len(files)} files)"
    try:
        commit = api.upload_folder(repo_id, folder_path=str(folder), commit_message=message, repo_type="model",
                                   use_cache=False, allow_patterns=[glob.escape(p) for p, _ in files])
    except (errs["PermissionDeniedError"], errs["AuthenticationError"]):
        raise PublishError(f"ModelScope refused the upload to {repo_id}: the token has no write permission there "
                           f"(create a write token at {TOKEN_PAGE})") from None
    except (errs["HubError"], OSError, RuntimeError) as err:
        raise PublishError(f"upload to {repo_id} failed ({_headline(err, token)}); the files in {folder} are "
                           "unchanged: run the same command again to retry") from None
    finally:
        for name in _IGNORED_NAMES:  # use_cache=False writes none; never leave one behind
            (folder / name).unlink(missing_ok=True)
    return PublishResult(repo_id, folder, files, False, model_url(repo_id), created, commit, user)


@logged_step("06_publish")
@one_writer("publish")
def publish(cfg: Config, repo_id: str, dry_run: bool = True, token: str | None = None, private: bool = False,
            commit_message: str | None = None) -> PublishResult:
    """Assemble `cfg.publish_dir` and upload it as ModelScope model `repo_id`; a dry run (default) sends nothing.

    The token comes from $MODELSCOPE_API_TOKEN (`token` overrides it, for library use only).
    """
    repo_id = validate_repo_id(repo_id)
    token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip()
    if not dry_run and not token:
        raise PublishError(f"no ModelScope token: set the environment variable {TOKEN_ENV} to an access token with "
                           f"write permission ({TOKEN_PAGE}); or do a dry run to only see what would be uploaded")
    folder = assemble(cfg, repo_id)
    files = files_to_upload(folder)
    if dry_run:
        return PublishResult(repo_id, folder, files, True, model_url(repo_id))
    try:
        return _upload(repo_id, folder, files, token, private, commit_message)
    except PublishError as err:
        raise PublishError(_redact(str(err), token)) from None


__all__ = ["PublishResult", "assemble", "files_to_upload", "publish", "validate_repo_id"]
