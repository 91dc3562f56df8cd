"""SIGINT / SIGTERM during a run: recorded, answered at a safe point, never mid-write.

The loop checks the record after each step (checkpoint, exit 130 / 143); during the final
save the record just waits until the outputs are complete.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from difftrain.launch import process_rank

logger = logging.getLogger("difftrain")


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Record SIGINT / SIGTERM instead of dying mid-step; the loop stops at the step's end."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def record(signum, frame):
        if not received and process_rank() == 0:  # one process says it for all
            logger.warning("%s received: stopping after this step", signal.Signals(signum).name)
        received.append(signum)

    for sig in signals:
        signal.signal(sig, record)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def startup_interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C during start-up (checks, model loading) is recorded and answered at the next
    safe point, where the returned `check()` raises KeyboardInterrupt (exit 130).

    Raised at an arbitrary moment instead, it can land inside a library's C code (pybind11
    then aborts the process) or in a `__del__` (where Python swallows it and the run goes
    on). A second Ctrl-C stops at once, for a start-up that takes long.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def record(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    def check() -> None:
        if received:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
