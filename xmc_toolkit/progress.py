"""The progress bar of training and prediction (rich), or a no-op: one for every loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(show: bool, description: str, total: int | None,
              fields: dict[str, Any] | None = None) -> Iterator[Callable[..., None]]:
    """A rich progress bar (or a no-op) as ``advance(n, **fields)``."""
    if not show:
        yield lambda n=1, **kw: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, transient=True) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **kw: Any) -> None:
            info = " ".join(f"{k}={v}" for k, v in kw.items())
            prog.update(task, advance=n, info=info)

        yield advance
