"""Peak memory is what a piece of work adds at its highest, not what the process held before it."""

import os

import pytest
import torch

from rapc.bench.memory import in_fresh_process, method, peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="CPU peak memory needs Linux")
def test_cpu_peak_counts_a_freed_allocation_made_during_the_work_and_not_the_memory_before_it():
    held = torch.ones(32 * 2**20 // 4)  # 32 MiB that exist before the work: in before_mib, not in the increment
    result = peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), CPU)  # 64 MiB, freed when the work returns
    assert 60 <= result.increment_mib < 64 + 32
    assert result.before_mib > 32 and result.peak_mib == pytest.approx(result.before_mib + result.increment_mib)
    assert set(result.as_dict()) == {"peak_mib", "before_mib", "increment_mib"}
    del held


def test_the_method_line_says_what_is_counted_on_each_device():
    assert "VmHWM" in method(CPU) and "max_memory_allocated" in method(torch.device("cuda"))


def test_a_fresh_process_is_another_process_and_returns_the_result():
    assert in_fresh_process(os.getpid) != os.getpid()
