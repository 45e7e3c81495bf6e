"""One writer per step per work dir: an OS file lock, released by the kernel when its holder dies.

Two `train` runs in one work dir would replace each other's LoRA, delete each other's checkpoints and
mix their loss.csv rows; the second one stops at once with an error naming the first (PID and command,
read from a small record beside the lock). The lock itself is `flock`ed through `filelock`, so a crashed
or killed holder frees it at once, and a reused PID can never look like a live holder.
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

from filelock import FileLock, Timeout

from kolors_lib.core.errors import BusyError
from kolors_lib.core.files import write_json

F = TypeVar("F", bound=Callable[..., Any])
_HELD: set[Path] = set()  # locks this process holds (a step calling itself again must not block)


def lock_path(workdir: Path, step: str) -> Path:
    """The lock file of `step` in `workdir`."""
    return Path(workdir) / f".lock-{step}"


def holder_path(lock: Path) -> Path:
    """The record of who holds `lock` (PID, host, command), written by the holder."""
    return lock.with_name(lock.name + ".holder.json")


def read_holder(lock: Path) -> dict[str, Any] | None:
    """The holder's record, or None when it is unreadable (being written) or gone."""
    try:
        data = json.loads(holder_path(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _busy(step: str, path: Path) -> BusyError:
    """The one-line error naming the running holder."""
    holder = read_holder(path) or {}
    who = f"pid {holder['pid']}: {holder.get('command', '?')}" if "pid" in holder else "holder unknown"
    return BusyError(f"another {step} is running in {path.parent} ({who}); wait for it to finish or stop it, "
                     f"then run again (lock: {path})")


@contextlib.contextmanager
def step_lock(workdir: str | Path, step: str) -> Iterator[Path]:
    """Hold the lock of `step` in `workdir` while the block runs; BusyError if another live process holds it."""
    path = lock_path(Path(workdir), step).absolute()
    if path in _HELD:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(path)
        if holder is not None and holder["pid"] == os.getppid() and holder.get("host") == socket.gethostname():
            yield path  # a worker the holder started (Lightning's DDP re-launch): part of the same run
            return
        raise _busy(step, path) from None
    _HELD.add(path)
    try:
        write_json({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or sys.executable},
                   holder_path(path))
        yield path
    finally:
        _HELD.discard(path)
        with contextlib.suppress(FileNotFoundError):
            holder_path(path).unlink()
        lock.release()


def one_writer(step: str) -> Callable[[F], F]:
    """Decorate a step function whose first argument is the Config: it runs holding the step's lock."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with step_lock(cfg.workdir, step):
                return fn(cfg, *args, **kwargs)
        return locked  # type: ignore[return-value]
    return wrap
