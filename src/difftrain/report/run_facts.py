"""Read what a training run left in its output folder, for `difftrain report RUN_DIR`.

    facts = read_run(Path("runs/x"))   # UserError for a missing / non-run folder, bad metrics

Only `metrics.jsonl` is held to its format (the plots are drawn from it); every other file
is optional and described as it is found: absent, unreadable or of an unknown shape is said
in the report, never raised. Standard library and PyYAML only: no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from difftrain.errors import UserError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
GRID_NAME = re.compile(r"^step-(\d+)\.png$")
RUN_FILES = ("metrics.jsonl", "config.yaml")  # either makes a folder a run folder


@dataclass
class Metrics:
    """metrics.jsonl, one row per step (the last line of a step wins), in step order."""

    rows: list[dict] = field(default_factory=list)
    ignored_lines: int = 0  # a torn last line from a kill, anything that is not a step
    present: bool = False

    def series(self, key: str) -> tuple[list[int], list[float], list[int]]:
        """(steps, finite values, steps whose value was NaN/inf) of `key`; rows without it
        (val_loss on most steps, grad_norm null) are left out."""
        steps, values, non_finite = [], [], []
        for row in self.rows:
            value = number(row.get(key))
            if value is None:
                continue
            if math.isfinite(value):
                steps.append(row["step"])
                values.append(value)
            else:
                non_finite.append(row["step"])
        return steps, values, non_finite


@dataclass
class Checkpoint:
    step: int
    path: Path
    size: int
    complete: bool  # has the manifest.json a finished checkpoint gets last


@dataclass
class RunFacts:
    run_dir: Path
    metrics: Metrics
    config_text: str | None
    config: dict | None
    env: dict | None
    manifest: dict | None
    buckets: dict | None
    skipped: list[tuple[str, str]] | None
    grids: list[tuple[int, Path]]
    checkpoints: list[Checkpoint]
    timings: dict | None
    problems: list[str] = field(default_factory=list)  # optional files found but unreadable

    def prompts(self) -> list[str]:
        validation = (self.config or {}).get("validation")
        prompts = validation.get("prompts") if isinstance(validation, dict) else None
        return [str(p) for p in prompts] if isinstance(prompts, list) else []


def number(value: object) -> float | None:
    """A metric as a float: numbers, and the "nan"/"inf" strings metrics.jsonl writes."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"RUN_DIR {run_dir}: folder not found; pass a training output folder")
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir}: not a folder; pass a training output folder")
    if not any((run_dir / name).exists() for name in RUN_FILES):
        hint = (
            "; it looks like a test-run folder: use `difftrain report --ci-dir` for the checklist"
            if (run_dir / "junit").is_dir() or (run_dir / "logs").is_dir()
            else ""
        )
        raise UserError(
            f"RUN_DIR {run_dir}: not a run folder (no metrics.jsonl and no config.yaml); "
            f"pass the --output-dir of a training run{hint}"
        )


def read_metrics(path: Path) -> Metrics:
    if not path.exists():
        return Metrics()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(
            f"{path}: cannot be read ({why}); restore the run's metrics.jsonl or move it aside"
        ) from None
    by_step, ignored = {}, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            ignored += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row  # a resumed run's rewrite of a step replaces it
        else:
            ignored += 1
    if ignored and not by_step:
        raise UserError(
            f'{path}: no line is a JSON object with a "step" ({ignored} unreadable lines); '
            "restore the run's metrics.jsonl or move it aside"
        )
    rows = [by_step[step] for step in sorted(by_step)]
    return Metrics(rows=rows, ignored_lines=ignored, present=True)


def read_object(path: Path, problems: list[str]) -> dict | None:
    """A JSON object file; None (and a note in `problems`) when absent, unreadable or other."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: not a JSON object")
        return None
    return data


def read_config(run_dir: Path, problems: list[str]) -> tuple[str | None, dict | None]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"config.yaml: unreadable ({type(exc).__name__})")
        return None, None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        problems.append("config.yaml: not valid YAML (shown as it is)")
        data = None
    return text, data if isinstance(data, dict) else None


def read_skipped(path: Path, problems: list[str]) -> list[tuple[str, str]] | None:
    """skipped_images.txt: `path<TAB>reason` per line."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        problems.append(f"skipped_images.txt: unreadable ({exc.strerror})")
        return None
    return [tuple((line.split("\t", 1) + [""])[:2]) for line in lines if line.strip()]


def folder_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder, onerror=lambda _exc: None):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def numbered(folder: Path, pattern: re.Pattern, *, dirs: bool) -> list[tuple[int, Path]]:
    """Entries of `folder` whose name matches `pattern`, by their number (step-10 after
    step-9, which a plain sort of the names would not give)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and (entry.is_dir() if dirs else entry.is_file()) and not entry.is_symlink():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def read_run(run_dir: Path) -> RunFacts:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    problems: list[str] = []
    config_text, config = read_config(run_dir, problems)
    env, manifest, buckets, timings = (
        read_object(run_dir / name, problems)
        for name in ("env.json", "data_manifest.json", "buckets.json", "timings.json")
    )
    checkpoints = [
        Checkpoint(step, path, folder_size(path), (path / "manifest.json").is_file())
        for step, path in numbered(run_dir, CHECKPOINT_NAME, dirs=True)
    ]
    return RunFacts(
        run_dir=run_dir,
        metrics=metrics,
        config_text=config_text,
        config=config,
        env=env,
        manifest=manifest,
        buckets=buckets,
        skipped=read_skipped(run_dir / "skipped_images.txt", problems),
        grids=numbered(run_dir / "samples", GRID_NAME, dirs=False),
        checkpoints=checkpoints,
        timings=timings,
        problems=problems,
    )
