"""Ctrl-C (or SIGTERM) during training: finish the step, checkpoint, stop.

A KeyboardInterrupt raised in the middle of a step leaves the weights, the optimizer
and the random generators out of step with each other, so nothing could be saved
then. Instead the first signal only asks the training loop to stop at the next step
boundary, where it checkpoints exactly; a second Ctrl-C interrupts at once and the
last checkpoint stands.

SIGTERM, what schedulers and torchrun send to stop a job, is taken as Ctrl-C. Under
torchrun each rank is in its own process group: a terminal's Ctrl-C reaches only
torchrun, which forwards it once to every rank and kills them 30 s later
(``--shutdown-timeout``). A second signal there comes from another sender (a scheduler
signalling every process as well as torchrun), not from an impatient user, and
interrupting one rank mid-step would leave the others waiting in a collective; so
under torchrun it only repeats the request.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context manager that turns SIGINT and SIGTERM into a request the loop polls between steps.

    ``interrupt_twice`` False: a second signal does not interrupt at once (the ranks of a torchrun).
    """

    def __init__(self, interrupt_twice: bool = True) -> None:
        self.requested = False
        self.interrupt_twice = interrupt_twice
        self._previous: dict[int, Callable[..., Any] | int | None] = {}

    def __enter__(self) -> StopRequest:
        # Signals reach only the main thread; an ignored signal (SIGINT of a background job) stays ignored.
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and self.interrupt_twice:
            raise KeyboardInterrupt
        self.requested = True
