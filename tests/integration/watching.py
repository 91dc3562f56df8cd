"""Watching a training process from a test: how far it got, and waiting for a moment in it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def steps_done(out: Path) -> int:
    """Optimizer steps the run in `out` has logged so far."""
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> bool:
    """Poll `condition` every 2 ms; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    return True
