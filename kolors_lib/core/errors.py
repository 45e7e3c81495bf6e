"""The course's errors: one base, `CourseError`, whose message says what went wrong and what to do next.

Every step raises a subclass (the names are kept so `except LoraError` still works); each also keeps
the built-in base it always had (ValueError, RuntimeError, FileNotFoundError). The command line
turns any CourseError into one line `error: ...` and exit code 2 (see `kolors_lib.cli.main`).
This module imports nothing heavy, so the CLI can catch every course error without loading torch.
"""

from __future__ import annotations


class CourseError(Exception):
    """Something the learner can fix: the message names the problem, where it is, and what to do next."""

    def one_line(self) -> str:
        """The message on one line (whitespace runs collapsed), as the command line prints it."""
        return " ".join(str(self).split())


class MissingInputError(CourseError, FileNotFoundError):
    """A file or folder a step reads is not there (the message says which step makes it)."""


class ConfigError(CourseError, ValueError):
    """A configuration file or value that cannot be used."""


class DataError(CourseError, ValueError):
    """A dataset source or metadata file that cannot be used."""


class FilterError(CourseError, ValueError):
    """A Data-Juicer recipe, run or result that cannot be used."""


class ModelUnavailableError(CourseError, RuntimeError):
    """A model that is neither on disk nor downloadable."""


class DownloadError(ModelUnavailableError):
    """A download from ModelScope failed: the message names the repo (and file), the cause and what to do."""


class TrainingError(CourseError, RuntimeError):
    """Training cannot go on (non-finite loss, empty dataset, bad settings)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class LoraError(CourseError, ValueError):
    """A LoRA file or state dict that cannot be used as asked."""


class LoraFormatError(LoraError):
    """Not a LoRA file we can read, or keys in no known naming."""


class LoraMismatchError(LoraError):
    """A LoRA that does not fit the model: missing or unexpected keys, wrong shapes."""


class LoraNotFoundError(MissingInputError):
    """The trained LoRA file is not where a step looks for it."""


class StoryError(CourseError, ValueError):
    """A story file that cannot be rendered (names the file and the scene)."""


class ScoreError(CourseError, ValueError):
    """A folder that cannot be scored: missing, empty, or without a readable panel."""


class PublishError(CourseError, ValueError):
    """Something that stops the model page from being assembled or uploaded."""


class WorkflowError(CourseError, ValueError):
    """A ComfyUI workflow that cannot be written or does not validate."""


class BusyError(CourseError, RuntimeError):
    """Another process is running the same step in the same work dir."""


class RecipeModelError(FilterError):
    """A recipe entry sets an argument that step 02 fills in from the course config."""


class DraftError(CourseError, ValueError):
    """A scene list that cannot be drafted from, or an output file that is not ours to replace."""


_OS_HINTS = {28: "free some space or use another --workdir", 30: "the file system is read-only: use another --workdir",
             13: "check the permissions or use another --workdir", 122: "the disk quota is exceeded"}


def os_error_line(err: OSError) -> str:
    """One line for an OS error (full disk, read-only, permissions): the path, the cause, what to do."""
    where = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    cause = err.strerror or str(err)
    hint = _OS_HINTS.get(err.errno or 0)
    return " ".join(f"{where + ': ' if where else ''}{cause}{'; ' + hint if hint else ''}".split())
