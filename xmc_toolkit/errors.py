"""Exception hierarchy of xmc-toolkit.

Every error a user can cause derives from :class:`XMCError`; its message says what went wrong
and how to fix it. The CLI prints such errors on one line and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

__all__ = ["XMCError", "DataFormatError", "ConfigError", "CheckpointError", "SamplerError",
           "OutputError", "LabelSetError"]


class XMCError(Exception):
    """Base class of every error raised on purpose by xmc-toolkit."""


class DataFormatError(XMCError, ValueError):
    """A data file does not follow its format.

    Args:
        path: the file that was read.
        line: 1-based line number of the offending line, or ``None`` when it is not line-bound.
        message: what was expected and what was found.
    """

    def __init__(self, path: str | PathLike[str] | None, line: int | None, message: str) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.message = message
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class ConfigError(XMCError, ValueError):
    """One or more configuration values are invalid; ``problems`` lists every one of them."""

    def __init__(self, problems: Iterable[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = f"invalid configuration: {self.problems[0]}"
        else:
            msg = "invalid configuration (%d problems): %s" % (
                len(self.problems),
                "; ".join(self.problems),
            )
        super().__init__(msg)


class CheckpointError(XMCError):
    """A model directory or checkpoint is missing, corrupt or does not match the model."""


class SamplerError(XMCError, ValueError):
    """A sampler was misused (bad shapes, ids out of range, sample before update, ...)."""


class OutputError(XMCError):
    """An output file or directory cannot be written (disk full, permissions, a missing folder,
    a path that is a file or a special file), is in use by another run, or would overwrite
    earlier work without ``--force``."""


class LabelSetError(XMCError, ValueError):
    """New labels cannot join a model's label set (colliding or missing names, no new labels)."""
