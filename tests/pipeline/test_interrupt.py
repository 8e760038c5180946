import os
import signal

import pytest

from rapc.pipeline.interrupt import StopRequest


def test_first_ctrl_c_is_a_stop_request_the_second_interrupts_and_the_handler_is_restored():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
