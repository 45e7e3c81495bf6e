"""Step 01's ModelScope dataset: its parquet files fetched like the models (checked, resumed, recorded), then read.

The files come through modelscope's own download (sizes and sha256 checked against the hub's file list, a
partial file resumed), into `<workdir>/data/modelscope`. A file that is not readable parquet is reported
as skipped and removed from that cache, so the next import fetches it again instead of failing on it
every time; the other files' rows are imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kolors_lib.core.config import Config
from kolors_lib.core.downloads import Pattern, fetch_repo, read_manifest
from kolors_lib.core.errors import DataError, DownloadError

# where a split's parquet files sit in a hub dataset (the first layout the repo has is taken)
SPLIT_LAYOUTS = ("data/{split}-*.parquet", "{subset}/{split}-*.parquet", "data/{split}/*.parquet",
                 "{subset}/{split}/*.parquet")
HINT = ("pass a local image folder instead: `python -m kolors_lib data import SRC` (or set data.source to a "
        "folder, or 'sample', in the config)")


def split_patterns(cfg: Config) -> list[Pattern]:
    """The allow list of cfg.data.split's parquet files: one entry, its alternatives the known layouts."""
    return [tuple(p.format(split=cfg.data.split, subset=cfg.data.subset) for p in SPLIT_LAYOUTS)]


def split_files(folder: Path, patterns: Sequence[Pattern]) -> list[Path]:
    """The split's parquet files in `folder`: the ones its download record lists, else the first layout found."""
    record = read_manifest(folder)
    if record is not None:
        return [folder / rel for rel in sorted(record["files"])]
    for entry in patterns:
        for layout in entry if isinstance(entry, tuple) else (entry,):
            found = sorted(folder.glob(layout))
            if found:
                return found
    return []


class HubRows:
    """The rows of a dataset's parquet files, in file order; an unreadable file becomes an entry of `skipped`."""

    def __init__(self, dataset_id: str, folder: Path, files: list[Path]) -> None:
        import pyarrow.parquet as pq

        self.dataset_id, self.folder = dataset_id, folder
        self.skipped: list[dict[str, str]] = []
        self.files: list[tuple[Path, int]] = []
        for path in files:
            try:
                self.files.append((path, pq.ParquetFile(path).metadata.num_rows))
            except Exception as err:  # pyarrow raises ArrowInvalid, OSError...: any of them means unreadable
                self._drop(path, err)

    def _drop(self, path: Path, err: BaseException) -> None:
        """Report `path` as skipped and remove it from the cache, so the next import fetches it again."""
        rel = path.relative_to(self.folder).as_posix() if path.is_relative_to(self.folder) else path.name
        cause = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        self.skipped.append({"source": f"modelscope:{self.dataset_id}/{rel}",
                             "reason": f"not a readable parquet file ({cause}); removed from the download "
                                       f"cache {self.folder}, the next import fetches it again"})
        path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(rows for _, rows in self.files)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        for path, _ in self.files:
            try:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
                    yield from batch.to_pylist()
            except Exception as err:  # a damaged row group: the rows before it are kept
                self._drop(path, err)


def dataset_rows(cfg: Config) -> HubRows:
    """cfg.data.dataset_id's rows of cfg.data.split, downloaded into <workdir>/data/modelscope (or found there)."""
    patterns = split_patterns(cfg)
    try:
        folder = fetch_repo(cfg.data.dataset_id, cfg.workdir / "data" / "modelscope", patterns, HINT,
                            repo_type="dataset", complete=lambda f: bool(split_files(f, patterns)))
    except DownloadError as err:
        raise DataError(err.one_line()) from None
    return HubRows(cfg.data.dataset_id, folder, split_files(folder, patterns))
