"""Peak memory of a piece of work, measured so that nothing else the process did counts.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors; not the
allocator's cache or the CUDA context). On CPU (Linux): the process's peak resident set (VmHWM),
reset to the current RSS through ``/proc/self/clear_refs`` after ``malloc_trim`` has returned the
heap glibc keeps after frees, so the peak is the highest RSS during the work and the increment is
what the work added to what the process held before it (model, data, libraries). Child processes
(DataLoader workers) are not counted. Run the work in a fresh process (``in_fresh_process``) so
that earlier allocations, and freed memory the allocator keeps, do not inflate the figures.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from rapc.errors import RapcError

MIB = 2**20
Result = TypeVar("Result")


@dataclass(frozen=True)
class PeakMemory:
    peak_mib: float  # the highest memory held during the work
    before_mib: float  # memory held when the work began

    @property
    def increment_mib(self) -> float:
        return self.peak_mib - self.before_mib

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"increment_mib": self.increment_mib}


def method(device: torch.device) -> str:
    """How ``peak_memory`` measures on ``device``, in one line for a report."""
    if device.type == "cuda":
        return "CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors; not the allocator cache or context)"
    return ("CPU: peak resident set (VmHWM), reset via /proc/self/clear_refs after malloc_trim; "
            "+MiB = peak - RSS before the work; child processes (DataLoader workers) not counted")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RapcError(f"/proc/self/status has no {field}: peak memory on CPU needs Linux")


def _reset_cpu_peak() -> int:
    """Give freed heap back to the OS, make VmHWM the current RSS, and return that RSS in bytes."""
    if not Path("/proc/self/clear_refs").exists():
        raise RapcError("/proc/self/clear_refs is missing: peak memory on CPU needs Linux")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    return _status_bytes("VmRSS")


def peak_memory(work: Callable[[], object], device: torch.device) -> PeakMemory:
    """Run ``work`` once and measure the peak memory on ``device`` while it ran, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = _reset_cpu_peak()
        work()
        peak = _status_bytes("VmHWM")
    return PeakMemory(peak / MIB, before / MIB)


def in_fresh_process(function: Callable[..., Result], *args: Any) -> Result:
    """``function(*args)`` in a new spawned Python process: no memory, threads or CUDA context of
    this one. ``function`` and its arguments must be picklable (a module-level function, plain data)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()
