"""Does a call release the GIL? (tests only)

With a 10 s switch interval a thread that wants the GIL cannot take it from a caller that
holds it, so the ticks a spinning thread counts during one call prove the call let go.
"""
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def ticks_during(call: Callable[[], T]) -> tuple[T, int]:
    """Run ``call``; return its result and how often another thread ran meanwhile."""
    ticks = [0]
    started = threading.Event()
    stop = threading.Event()

    def other() -> None:
        started.set()
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0)  # hand the GIL back at once: ticks only while the caller lets go

    old = sys.getswitchinterval()
    thread = threading.Thread(target=other)
    thread.start()
    started.wait()
    sys.setswitchinterval(10.0)
    try:
        before = ticks[0]
        result = call()
        during = ticks[0] - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        thread.join()
    return result, during
