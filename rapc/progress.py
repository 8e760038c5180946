"""Progress reporting: rich bars in a terminal, nothing in tests or library use."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter(Protocol):
    def begin(self, title: str, total: int) -> None: ...
    def advance(self, live: dict[str, float] | None = None) -> None: ...
    def end(self, summary: str) -> None: ...
    def log(self, text: str) -> None: ...


class SilentReporter:
    def begin(self, title: str, total: int) -> None:
        pass

    def advance(self, live: dict[str, float] | None = None) -> None:
        pass

    def end(self, summary: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass


class RichReporter:
    """A live bar per epoch with running loss/accuracy; a summary line per finished epoch stays above it.

    Use as a context manager around the run, so the live display is torn down on errors too.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[live]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress.live.is_started:
            self._progress.stop()

    def begin(self, title: str, total: int) -> None:
        if not self._progress.live.is_started:  # started on first use: an early error prints nothing else
            self._progress.start()
        self._task = self._progress.add_task(title, total=total, live="")

    def advance(self, live: dict[str, float] | None = None) -> None:
        if self._task is None:
            return
        fields = {"live": "  ".join(f"{k} {v:.3f}" for k, v in live.items())} if live else {}
        self._progress.update(self._task, advance=1, **fields)

    def end(self, summary: str) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self._progress.console.print(summary)

    def log(self, text: str) -> None:
        self._progress.console.print(text)
