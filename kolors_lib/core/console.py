"""What a learner sees while a step runs: results and progress, not other libraries' chatter.

`logged_step("03_train")` (a decorator on each step function) and `step_log(cfg, "03_train")` send the
warnings, logging and prints of the libraries a step drives (Lightning, DiffSynth, Data-Juicer,
transformers...) to `<workdir>/logs/03_train.log` instead of the notebook or terminal. Warnings raised
by the course's own code or by your code are still shown.

`progress(...)` is the course's progress bar: a widget in Jupyter whose saved output shows where it
ended (not 0%), plain text on the terminal even while a step log captures stderr.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import site
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

from tqdm.auto import tqdm as _auto_tqdm

try:
    from tqdm.notebook import tqdm as _notebook_tqdm
except ImportError:  # no ipywidgets
    _notebook_tqdm = None

F = TypeVar("F", bound=Callable[..., Any])
_IN_NOTEBOOK = _notebook_tqdm is not None and issubclass(_auto_tqdm, _notebook_tqdm)
_ACTIVE: list[Path] = []
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


class _Router(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: writes go to the active step log, else to the stream it replaced.

    Libraries keep the stream they saw at set-up (logging handlers, loguru sinks); a router they kept
    follows every later step log instead of writing into a closed file.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.fallback: TextIO = getattr(sys, name)
        self.target: TextIO | None = None

    def _out(self) -> TextIO:
        return self.target if self.target is not None else self.fallback

    def write(self, text: str) -> int:
        """Write to the log (inside a step) or the console."""
        self._out().write(text)
        return len(text)

    def flush(self) -> None:
        """Flush the current destination."""
        self._out().flush()

    def writable(self) -> bool:
        """Always writable."""
        return True

    def isatty(self) -> bool:
        """A terminal only when not logging to a file."""
        return self.target is None and bool(getattr(self.fallback, "isatty", lambda: False)())

    def fileno(self) -> int:
        """The current destination's file descriptor."""
        return self._out().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """Text encoding of the destination."""
        return getattr(self._out(), "encoding", None) or "utf-8"


_ROUTERS: dict[str, _Router] = {}


def _router(name: str) -> _Router:
    """The one router for sys.<name>, pointed back at the stream sys.<name> is now."""
    router = _ROUTERS.setdefault(name, _Router(name))
    current = getattr(sys, name)
    if current is not router:
        router.fallback = current
    return router


def console_stream() -> TextIO:
    """Where text progress bars write, also while a step log captures sys.stdout/stderr: the terminal's
    stderr, or in a Jupyter kernel without ipywidgets its stdout (stderr would show as a log block)."""
    stream = sys.stdout if in_kernel() else sys.stderr
    return stream.fallback if isinstance(stream, _Router) else stream


def in_kernel() -> bool:
    """Whether this code runs inside a Jupyter kernel (not merely in a process that imported ipykernel)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise logger `name`'s level for the block only (an import's version warnings a learner cannot act on)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(max(level, saved))
    try:
        yield
    finally:
        logger.setLevel(saved)


def _library_dirs() -> tuple[str, ...]:
    """Folders of installed packages and the standard library: code there is a library's, not the learner's."""
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    with contextlib.suppress(AttributeError):
        paths.update(site.getsitepackages())
    return tuple(str(Path(p).resolve()) for p in paths if p)


def from_library(filename: str) -> bool:
    """True for a file of an installed package or the standard library (not the course's, not yours)."""
    if not filename or filename.startswith("<"):  # frozen importlib and the like
        return True
    path = Path(filename).resolve()
    if path.is_relative_to(_PACKAGE_DIR):  # the course's own code, even when installed into site-packages
        return False
    text = str(path)
    return text.startswith(_library_dirs()) or "/site-packages/" in text or "/dist-packages/" in text


def _warned_from() -> str:
    """File of the code that called warnings.warn (libraries' `stacklevel` blames their caller instead)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == warnings.__file__:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _warnings_to(log: TextIO, show: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that files library warnings in `log` and shows the course's and yours."""

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if from_library(_warned_from()):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def _console_handlers(streams: tuple[Any, ...]) -> list[logging.StreamHandler]:
    """Logging handlers (any logger) that write to one of `streams` (the console), file handlers excluded."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    ids = {id(s) for s in streams if s is not None}
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(type(h), "stream", None), property)  # logging.lastResort follows sys.stderr
            and id(h.stream) in ids]


@contextlib.contextmanager
def _library_bars_hidden() -> Iterator[None]:
    """In Jupyter, other libraries' bars ("Loading checkpoint shards") are disabled: a widget cannot go to a
    log file, and a third-party bar would be saved at 0%. (In a terminal they write to sys.stderr: the log.)"""
    if _notebook_tqdm is None or not _IN_NOTEBOOK:
        yield
        return
    original = _notebook_tqdm.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(self, progress):
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    _notebook_tqdm.__init__ = init
    try:
        yield
    finally:
        _notebook_tqdm.__init__ = original


@contextlib.contextmanager
def step_log(cfg: Any, step: str) -> Iterator[Path]:
    """Send libraries' warnings, logging and prints to `<cfg.logs_dir>/<step>.log` for the block; yield its path.

    A step run inside another (publish assembling the folder) writes into the outer step's log.
    When the block fails, the exception gets a note naming the log.
    """
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    path = Path(cfg.logs_dir) / f"{step}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as log, _library_bars_hidden():
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {step}\n")
        saved = sys.stdout, sys.stderr
        routers = _router("stdout"), _router("stderr")
        handlers = {h: h.stream for h in _console_handlers((*saved, sys.__stdout__, sys.__stderr__))}
        root = logging.getLogger()
        root_handlers, root_level = list(root.handlers), root.level
        for handler in handlers:  # a router, not the file: a library that copies a handler's stream never
            handler.setStream(routers[1])  # holds the log file after it is closed
        for router in routers:
            router.target = log
        sys.stdout, sys.stderr = routers
        show = warnings.showwarning
        warnings.showwarning = _warnings_to(log, show)
        _ACTIVE.append(path)
        try:
            yield path
        except BaseException as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"(messages of the libraries this step used: {path})")
            raise
        finally:
            _ACTIVE.pop()
            warnings.showwarning = show
            sys.stdout, sys.stderr = saved
            for router in routers:
                router.target = None
            for handler, stream in handlers.items():
                handler.setStream(stream)
            # a library's logging.basicConfig (Data-Juicer's ops run one at import) would print every library's
            # INFO lines from then on, twice where a library also has its own handler: undo it
            root.handlers[:] = root_handlers
            root.setLevel(root_level)


def show(text: str) -> None:
    """Print a line for the learner (stdout), also from inside a step log that captures libraries' prints."""
    out = sys.stdout.fallback if isinstance(sys.stdout, _Router) else sys.stdout
    print(text, file=out, flush=True)


@contextlib.contextmanager
def real_streams() -> Iterator[None]:
    """Inside a step log, hand sys.stdout/stderr back to the real console for the block.

    For code that passes our streams' file descriptors to processes it starts (Ray's node start-up
    times out when its children inherit the step log's descriptors)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s.fallback if isinstance(s, _Router) else s for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def logged_step(step: str) -> Callable[[F], F]:
    """Decorate a step function `fn(cfg, ...)` so that it runs inside `step_log(cfg, step)`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with step_log(cfg, step):
                return fn(cfg, *args, **kwargs)

        return cast(F, run)

    return decorate


class progress(_auto_tqdm):  # noqa: N801 - used like tqdm
    """tqdm.auto's bar; in Jupyter its output is replaced by the finished bar on close, so a saved notebook
    shows where it ended (a `leave=False` bar leaves nothing). In a terminal it writes to the console."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._handle: Any = None
        if _IN_NOTEBOOK:
            kwargs["display"] = False
        else:
            kwargs.setdefault("file", console_stream())
        super().__init__(*args, **kwargs)
        if _IN_NOTEBOOK and not self.disable:
            from IPython.display import display

            self._handle = display(self.container, display_id=True)
            self.displayed = True

    def close(self) -> None:
        """Close the bar; in Jupyter, overwrite its output with the final state."""
        super().close()
        handle, self._handle = self._handle, None
        if handle is not None:
            if self.leave:
                handle.update(self.container)
            else:
                handle.update({"text/plain": ""}, raw=True)
