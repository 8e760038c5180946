"""Ctrl-C during training: finish the step, checkpoint, stop.

A KeyboardInterrupt raised in the middle of a step leaves the weights, the optimizer
and the random generators out of step with each other, so nothing could be saved
then. Instead the first Ctrl-C only asks the training loop to stop at the next step
boundary, where it checkpoints exactly; a second Ctrl-C interrupts at once and the
last checkpoint stands.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any


class StopRequest:
    """A context manager that turns SIGINT into a request the loop polls between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[..., Any] | int | None = None

    def __enter__(self) -> StopRequest:
        # Signals reach only the main thread; an ignored SIGINT (a background job) stays ignored.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
