"""Writing files safely: atomic writes with normal permissions, folder swaps, hashes, JSON.

Every output of the course goes through here, so a crash or Ctrl-C never leaves a half-written
file or folder where a later step (or a learner) would read it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (reading it means setting it, so it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions a plain `open(path, "w")` would give: 0666 minus the umask (0644 usually)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """Permissions a plain `mkdir` would give: 0777 minus the umask (0755 usually)."""
    return 0o777 & ~_umask()


def named(err: BaseException, path: str | Path) -> BaseException:
    """`err`, or for an OS error that names no file (a write hitting a full disk) the same error naming `path`."""
    if isinstance(err, OSError) and err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror, str(path))
    return err


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    mkstemp makes the file 0600; it gets the permissions a normal write would have given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        renamed = named(err, path)
        if renamed is err:
            raise
        raise renamed from err


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (newlines written as given)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON (UTF-8, Chinese kept readable, indent 2, final newline) atomically."""
    # allow_nan=False: NaN is not JSON; a value that slipped through must fail here, not in a reader
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n")


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The .safetensors bytes of `tensors`, the same for the same input (keys and metadata sorted).

    safetensors' own writer orders metadata keys by a randomly seeded hash map, so identical runs
    gave different files (and a different sha256, which step 06 checks).
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        blob = t.reshape(-1).view(_uint8()).numpy().tobytes() if t.numel() else b""
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} as safetensors")
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def _uint8() -> Any:
    import torch

    return torch.uint8


def save_safetensors(tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as .safetensors atomically; a file already holding the same bytes is left untouched."""
    data = safetensors_bytes(tensors, metadata)
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return path  # a no-op re-run keeps the file (and its mtime) as it was
    return write_bytes(path, data)


def save_torch(state: Any, path: str | Path) -> Path:
    """torch.save atomically (checkpoints: a crash never leaves a half-written one)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (signal 0 probes without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def _leftover_owner(name: str, prefix: str) -> int | None:
    """The PID in a `.<name>.tmp-<pid>-xxxx` / `.<name>.old-<pid>-xxxx` folder name (None: no PID, an older run)."""
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def recover_folder(target: str | Path) -> Path:
    """Undo what a killed swap left beside `target`: put a lone `.old` back, remove stale `.tmp`/`.old` folders.

    A kill between swap_folder's two renames leaves `target` missing and the previous folder under
    `.<name>.old-<pid>-*`; folders of processes still running are left alone.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return target
    for kind in ("old", "tmp"):
        prefix = f".{target.name}.{kind}-"
        for leftover in sorted(target.parent.glob(f"{glob.escape(prefix)}*")):
            owner = _leftover_owner(leftover.name, prefix)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                continue
            if kind == "old" and not (target.exists() or target.is_symlink()):
                os.replace(leftover, target)  # the swap was killed after moving the old folder aside
            elif leftover.is_symlink() or leftover.is_file():
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)
    return target


def swap_folder(new: str | Path, target: str | Path) -> Path:
    """Put the finished folder `new` in place of `target` with renames; the old one is removed after.

    Readers never see a half-written `target`; if the second rename fails the old folder is put back, and
    if the process is killed between the renames, the next `recover_folder(target)` puts it back.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        yield stage
        stage.chmod(folder_mode())  # mkdtemp makes it 0700
        swap_folder(stage, target)
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        renamed = named(err, target)
        if renamed is err:
            raise
        raise renamed from err


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def move_aside(path: str | Path, label: str = "old") -> Path | None:
    """Rename `path` to a free `<name>.<label>-N` beside it (never deletes); returns the new path or None."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while (dest := path.with_name(f"{path.name}.{label}-{n}")).exists():
        n += 1
    os.replace(path, dest)
    return dest
