"""Gather what the test runs left in the ci-dir: JUnit sections, env.json, nvidia-smi, logs.

Every file is optional: a missing or unreadable one is recorded as absent, never raised.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from difftrain.report.junit import Section, read_sections

SMOKE_LOG = "text2image_smoke.log"
NESTED_CI_NAME = "_ci_tmp"  # a ci-dir inside the ci-dir is test data, not a run (see run_files)
SMI_KEYS = ("name", "driver_version", "memory.total", "compute_cap")  # noxfile's CSV query
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Evidence:
    """Everything read from the ci-dir, gathered once and rendered by the block functions."""

    ci_dir: Path
    sections: list[Section]
    env: dict | None
    env_path: Path | None
    env_files: int
    smi_rows: list[dict[str, str]]
    smi_text: str | None
    logs: list[Path]

    def rel(self, path: Path) -> str:
        """`_ci_tmp/logs/x.log`: paths shown relative to the ci-dir, as the runbook names them."""
        try:
            return (PurePosixPath(self.ci_dir.name) / path.relative_to(self.ci_dir)).as_posix()
        except ValueError:
            return str(path)

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    @cached_property
    def machine(self) -> dict:
        """The machine running the report (local_machine), for what the ci-dir lacks."""
        from difftrain.report.local_machine import machine_snapshot

        return machine_snapshot()

    @cached_property
    def machine_smi_text(self) -> str | None:
        from difftrain.report.local_machine import nvidia_smi_text

        return nvidia_smi_text()


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is missing or unreadable (never raises)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def walk_files(root: Path, name: str | None = None, prune: tuple[str, ...] = ()) -> Iterator[Path]:
    """Files under `root` (optionally only those called `name`); unreadable folders skipped,
    and folders named in `prune` not entered."""
    for folder, dirs, files in os.walk(root, onerror=lambda _exc: None):
        dirs[:] = sorted(d for d in dirs if d not in prune)
        for file in sorted(files):
            if name is None or file == name:
                yield Path(folder) / file


def run_files(ci_dir: Path, root: Path, name: str) -> Iterator[Path]:
    """Files called `name` that the runs wrote under `root`, skipping nested ci-dirs.

    Tests of this module build fake `_ci_tmp/` folders (GPU env.json, a NaN in metrics.jsonl)
    inside the unit session's basetemp, `_ci_tmp/pytest_tmp/unit/`; they describe no real run.
    """
    return walk_files(root, name, prune=(NESTED_CI_NAME, ci_dir.name))


def newest_env(ci_dir: Path) -> tuple[dict | None, Path | None, int]:
    """The env.json to describe the machine: newest among those that saw a GPU, else newest.

    Unit and integration runs write CPU env.json files too, often after the GPU smoke; the
    GPU one is the one the checklist asks about.
    """
    candidates = []
    for path in run_files(ci_dir, ci_dir, "env.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            candidates.append((bool(data.get("gpus")), mtime, str(path), data, path))
    if not candidates:
        return None, None, 0
    *_, data, path = max(candidates, key=lambda c: c[:3])
    return data, path, len(candidates)


def read_smi_csv(path: Path) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv` (header optional)."""
    rows = [row for row in csv.reader((read_text(path) or "").splitlines(), skipinitialspace=True)]
    rows = [[cell.strip() for cell in row] for row in rows if any(c.strip() for c in row)]
    if not rows:
        return []
    # "memory.total [MiB]" -> "memory.total"
    header = [cell.split(" [")[0] for cell in rows[0]]
    if "name" in header:
        rows = rows[1:]
    else:
        header = list(SMI_KEYS)
    return [dict(zip(header, row, strict=False)) for row in rows]


def collect(ci_dir: Path) -> Evidence:
    env, env_path, env_files = newest_env(ci_dir)
    logs_dir = ci_dir / "logs"
    return Evidence(
        ci_dir=ci_dir,
        sections=read_sections(ci_dir),
        env=env,
        env_path=env_path,
        env_files=env_files,
        smi_rows=read_smi_csv(logs_dir / "nvidia-smi.csv"),
        smi_text=read_text(logs_dir / "nvidia-smi.txt"),
        logs=sorted(logs_dir.glob("*.log")),
    )
