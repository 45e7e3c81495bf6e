"""One writer per step per work dir: a small lock file holding the PID and command of the running step.

Two `train` runs in one work dir would replace each other's LoRA, delete each other's checkpoints and
mix their loss.csv rows; the second one now stops at once with an error naming the first. A lock left
by a process that no longer runs (killed, machine rebooted) is taken over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kolors_lib.errors import CourseError
from kolors_lib.files import pid_alive

F = TypeVar("F", bound=Callable[..., Any])
_HELD: set[Path] = set()  # locks this process holds (a step calling itself again must not block)


class BusyError(CourseError, RuntimeError):
    """Another process is running the same step in the same work dir."""


def lock_path(workdir: Path, step: str) -> Path:
    """The lock file of `step` in `workdir`."""
    return Path(workdir) / f".lock-{step}"


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it is unreadable (being written) or gone."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _try_create(path: Path, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False))
    return True


@contextlib.contextmanager
def step_lock(workdir: str | Path, step: str) -> Iterator[Path]:
    """Hold the lock of `step` in `workdir` while the block runs; BusyError if a live process holds it."""
    path = lock_path(Path(workdir), step).absolute()
    if path in _HELD:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or sys.executable}
    for _ in range(5):
        if _try_create(path, record):
            break
        holder = _holder(path)
        if holder is not None and holder["pid"] == os.getppid() and holder.get("host") == record["host"]:
            yield path  # a worker the holder started (Lightning's DDP re-launch): part of the same run
            return
        if holder is not None and (holder.get("host") != record["host"] or pid_alive(holder["pid"])):
            raise BusyError(f"another {step} is running in {path.parent} (pid {holder['pid']}: "
                            f"{holder.get('command', '?')}); wait for it to finish or stop it, then run again "
                            f"(lock: {path})")
        if holder is not None:  # its process is gone: take the lock over
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, stale)
                stale.unlink()
    else:
        raise BusyError(f"cannot take the {step} lock {path}: another process keeps creating it")
    _HELD.add(path)
    try:
        yield path
    finally:
        _HELD.discard(path)
        with contextlib.suppress(FileNotFoundError):
            if (_holder(path) or {}).get("pid") == os.getpid():
                path.unlink()


def one_writer(step: str) -> Callable[[F], F]:
    """Decorate a step function whose first argument is the Config: it runs holding the step's lock."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with step_lock(cfg.workdir, step):
                return fn(cfg, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
