"""Per-step metrics: `metrics.jsonl`, one JSON object per optimizer step.

`training.tracking` writes through `MetricsLog` on the main process; the other processes get a
`NullTracker`, so the training loop never branches on "do I write?".
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, record: dict[str, object]) -> None:
        # Flushed per line: a crash loses at most the line being written.
        self._file.write(json.dumps(_finite_or_string(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _finite_or_string(record: dict[str, object]) -> dict[str, object]:
    # JSON has no NaN/Infinity; write them as strings so every line stays valid JSON.
    return {
        key: str(value) if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= `last_step` (resume); a torn last line from a kill goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= last_step:
                kept.append(line + "\n")
    from difftrain.io import atomic_write_text

    atomic_write_text(path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def read_step_records(path: Path) -> tuple[dict[int, dict[str, object]], int]:
    """metrics.jsonl as {step: record} (the last line of a step wins, as after a resume),
    and how many lines were left out: torn by a kill, or not a step's record.

    Raises OSError / UnicodeDecodeError when the file cannot be read at all.
    """
    return step_records(path.read_text(encoding="utf-8"))


def step_records(text: str) -> tuple[dict[int, dict[str, object]], int]:
    """`read_step_records` of metrics.jsonl's text (`difftrain report` reads the file itself,
    to word its own errors)."""
    records, ignored = {}, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # torn, an over-long number, absurdly deep
            ignored += 1
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records[record["step"]] = record
        else:
            ignored += 1
    return records, ignored
