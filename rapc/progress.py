"""Progress reporting: rich bars in a terminal, nothing in tests or library use."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


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
    """One transient bar per epoch with live figures; a line per finished epoch stays on screen."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def begin(self, title: str, total: int) -> None:
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
        self._progress.start()
        self._task = self._progress.add_task(title, total=total, live="")

    def advance(self, live: dict[str, float] | None = None) -> None:
        if self._progress is None:
            return
        fields = {"live": "  ".join(f"{k} {v:.3f}" for k, v in live.items())} if live else {}
        self._progress.update(self._task, advance=1, **fields)

    def end(self, summary: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.console.print(summary)

    def log(self, text: str) -> None:
        self.console.print(text)
