"""`timings.json`: where a run's wall time went, split into start-up, training and saving.

    {"startup_s": 4.1, "training_s": 61.7, "saving_s": 0.3, "total_s": 66.1}

Start-up runs from the first import of difftrain (library imports, checks, model loading,
resume) to the first step, or for a later run in the same process from its start; training
covers the steps with their checkpoints and validation; saving is the final pipeline or LoRA
and the model card. A resumed run records its own process's times. `difftrain report` shows them.
"""

from __future__ import annotations

import time
from pathlib import Path

import difftrain
from difftrain.io import atomic_write_json

TIMINGS_NAME = "timings.json"


_first_run = True


class RunClock:
    def __init__(self) -> None:
        global _first_run
        # The first run of a process also waited for the imports; a later one (tests, a
        # Python user's loop, reproduce) did not, and starts now.
        self.started = difftrain.IMPORTED_AT if _first_run else time.perf_counter()
        _first_run = False
        self.training_started: float | None = None
        self.training_ended: float | None = None

    def training_starts(self) -> None:
        self.training_started = time.perf_counter()

    def training_ends(self) -> None:
        self.training_ended = time.perf_counter()

    def write(self, output_dir: Path) -> dict[str, float]:
        """Write timings.json now that the outputs are saved; returns what it wrote."""
        saved = time.perf_counter()
        started, ended = self.training_started or saved, self.training_ended or saved
        timings = {
            "startup_s": round(started - self.started, 3),
            "training_s": round(ended - started, 3),
            "saving_s": round(saved - ended, 3),
            "total_s": round(saved - self.started, 3),
        }
        atomic_write_json(Path(output_dir) / TIMINGS_NAME, timings)
        return timings
