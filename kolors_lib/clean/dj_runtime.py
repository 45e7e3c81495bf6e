"""Running Data-Juicer inside this process: its side effects undone, no run-time pip installs, a quiet
console, a local Ray with the workers' environment fixes, and torch on one thread in forked workers.

Step 02 (kolors_lib.clean.pipeline) resolves the recipe and reads the results; this module only runs it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kolors_lib.core.errors import CourseError, FilterError


@contextlib.contextmanager
def _no_runtime_installs() -> Iterator[None]:
    """Make Data-Juicer's lazy importer fail loudly instead of pip-installing a missing package."""
    from data_juicer.utils.lazy_loader import LazyLoader

    original = LazyLoader.__dict__["_install_package"]

    def refuse(cls: type, package_spec: str, pip_args: Any = None) -> None:
        raise FilterError(
            f"Data-Juicer tried to install {package_spec!r} at run time; install it in the venv "
            f"beforehand (see requirements.txt)"
        )

    LazyLoader._install_package = classmethod(refuse)
    try:
        yield
    finally:
        LazyLoader._install_package = original


@contextlib.contextmanager
def _dj_process_state() -> Iterator[None]:
    """Undo Data-Juicer's process-wide side effects: stdout/stderr redirection and RAY_JOB."""
    stdout, stderr = sys.stdout, sys.stderr
    ray_job = os.environ.get("RAY_JOB")
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        _reset_dj_logger()
        if ray_job is None:
            os.environ.pop("RAY_JOB", None)
        else:
            os.environ["RAY_JOB"] = ray_job


def _reset_dj_logger() -> None:
    """Close the log files Data-Juicer opened in its job folder; the next run opens its own.

    Data-Juicer sets up its logger once per process, so without this a second run would keep
    writing into the first run's (by then deleted) job folder.
    """
    from data_juicer.utils import logger_utils
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    logger_utils.LOGGER_SETUP = False


def _ray_worker_setup() -> None:
    """Run in every Ray worker: offline hubs and the CPU torchvision shim (imagededup needs it)."""
    from kolors_lib.core.compat import patch_torchvision, set_offline_env

    set_offline_env()  # this worker process exists for the one Data-Juicer run
    patch_torchvision()


@contextlib.contextmanager
def _local_ray(address: str) -> Iterator[None]:
    """Start a local Ray whose workers get the environment fixes; shut it down afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    prefixes = ("HF_", "TRANSFORMERS_", "_DJ_SPECIAL_TOKEN_")
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    env["RAY_JOB"] = "1"
    from kolors_lib.core.console import real_streams

    with real_streams():
        ray.init(
            address,
            runtime_env={"worker_process_setup_hook": "kolors_lib.clean.dj_runtime._ray_worker_setup", "env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_console() -> Iterator[None]:
    """Data-Juicer's console log at WARNING and no `datasets` bars; its job-folder log files keep INFO.

    A learner's notebook otherwise fills with hundreds of lines of configuration tables and
    per-op progress bars; the per-op counts are shown as a table by step 02 instead.
    """
    import datasets
    from data_juicer.config import config as dj_config
    from loguru import logger

    add, display = logger.add, dj_config.display_config

    def console_at_warning(sink: Any, *args: Any, **kwargs: Any) -> int:
        if sink is sys.stderr or sink is sys.stdout:
            kwargs["level"] = "WARNING"
        return add(sink, *args, **kwargs)

    bars = datasets.is_progress_bar_enabled()
    logger.add = console_at_warning  # Data-Juicer adds its sinks inside init_configs
    dj_config.display_config = lambda cfg: None  # a ~300-line table; the recipe is saved in the job folder
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        del logger.add  # the instance attribute shadowed the method; this restores it
        dj_config.display_config = display
        if bars:
            datasets.enable_progress_bars()


_FORK_HOOK: list[bool] = []


def single_threaded_forks() -> None:
    """Make every process forked from here on run torch on one thread (registered once per process).

    datasets' map forks a worker pool even for num_proc=1, so the model ops (aesthetic filter,
    captioner) run torch in a forked child; an OpenMP thread pool inherited across fork can deadlock
    there (the same reason PyTorch's DataLoader workers call torch.set_num_threads(1)).
    """
    if _FORK_HOOK:
        return
    import torch

    os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))
    _FORK_HOOK.append(True)


def run_data_juicer(recipe_path: Path, executor: str, ray_address: str = "local") -> Path:
    """Run a resolved recipe with Data-Juicer's Python API; return the job folder (traces, logs)."""
    from kolors_lib.core.compat import offline_hubs, patch_torchvision

    patch_torchvision()  # imagededup imports torchvision
    single_threaded_forks()
    # Ray must be up before init_configs, which already asks the cluster for its CPU count
    ray = _local_ray(ray_address) if executor == "ray" else contextlib.nullcontext()
    # HF datasets phones home on every jsonl load: offline for this run only (a later step may download)
    with offline_hubs(), _dj_process_state(), _no_runtime_installs(), _quiet_console(), ray:
        from data_juicer.config import init_configs

        import kolors_lib.clean.captioning  # noqa: F401 - registers kolors_caption_mapper before the recipe is read

        dj_cfg = init_configs(args=["--config", str(recipe_path)])
        if executor == "ray":
            from data_juicer.core.executor.ray_executor import RayExecutor as Executor
        else:
            from data_juicer.core import DefaultExecutor as Executor
        try:
            Executor(dj_cfg).run()
        except CourseError:
            raise
        except Exception as err:
            raise FilterError(f"Data-Juicer's {failing_op(err)} failed: {type(err).__name__}: {err} "
                              f"(recipe {recipe_path}; nothing was written)") from err
    return Path(dj_cfg.work_dir)


def failing_op(err: BaseException) -> str:
    """Name of the Data-Juicer op running when `err` was raised (innermost op frame), or 'a recipe op'."""
    # frames inside a worker process are lost in the pool's re-raise; the op's run() frame remains
    name = "a recipe op"
    for frame, _ in traceback.walk_tb(err.__traceback__):
        op = frame.f_locals.get("self")
        if isinstance(getattr(op, "_name", None), str) and hasattr(op, "run"):
            name = op._name
    return name
