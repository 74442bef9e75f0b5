"""A progress bar over epochs showing the latest losses, for the CLI and for notebooks."""

from __future__ import annotations

import math
import os
from typing import Any


class EpochProgress:
    """A rich progress bar over epochs showing the latest losses; yields the per-epoch callback."""

    def __init__(self, total: int, title: str, shown: tuple[str, ...], done: int = 0,
                 console=None, force: bool = False):
        self.total, self.title, self.shown, self.done = total, title, shown, done
        self.console, self.force = console, force

    def __enter__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[losses]}"), console=self.console,
                                 transient=False, disable=not self._shown())
        self.progress.__enter__()
        self.task = self.progress.add_task(self.title, total=max(self.total, self.done),
                                           completed=self.done, losses="")

        def on_epoch(done: int, record: dict[str, Any]) -> None:
            text = "  ".join(f"{k} {record[k]:.4g}" for k in self.shown
                             if isinstance(record.get(k), float) and math.isfinite(record[k]))
            total = max(self.total, done)
            self.progress.update(self.task, completed=done, total=total, losses=text)

        return on_epoch

    def _shown(self) -> bool:
        """On a terminal (or where asked), never into a log file or a pipeline's stderr."""
        if self.force or os.environ.get("ADVCLI_PROGRESS") == "1":
            return True
        return self.console is not None and self.console.is_terminal

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
