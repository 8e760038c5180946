import os
import signal

import pytest

from rapc.pipeline.interrupt import StopRequest


@pytest.fixture
def interactive():
    """SIGINT as an interactive Python has it, even when pytest runs as a background job with SIGINT
    ignored (which StopRequest rightly leaves ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_a_stop_request_the_second_interrupts_and_the_handlers_are_restored(signum, interactive):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequest() as stop:
        os.kill(os.getpid(), signum)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_under_torchrun_a_second_signal_only_repeats_the_request(interactive):
    """torchrun forwards one signal per rank; another (a scheduler signalling every process) must not
    interrupt one rank mid-step while the others wait for it in a collective."""
    with StopRequest(interrupt_twice=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
