"""Read what a training run left in its output folder, for `difftrain report RUN_DIR`.

    facts = read_run(Path("runs/x"))   # UserError for a missing / non-run folder, bad metrics

A run folder is one training claimed: it holds RUN_MARKER. Nothing in it is read (or, by
run_report, written) through a symbolic link: a linked input or output is refused, so the
page never shows a file from elsewhere and the report never writes outside the folder.

Only `metrics.jsonl` is held to its format (the plots are drawn from it); every other file
is optional and described as it is found: absent, unreadable or of an unknown shape is said
in the report, never raised. Standard library and PyYAML only: no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from difftrain.errors import UserError
from difftrain.run_folder import RUN_MARKER, records_a_run
from difftrain.training.metrics import step_records

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
GRID_NAME = re.compile(r"^step-(\d+)\.png$")
INPUT_NAMES = (
    RUN_MARKER, "metrics.jsonl", "config.yaml", "env.json", "data_manifest.json",
    "buckets.json", "timings.json", "skipped_images.txt", "samples",
)  # fmt: skip
"""What the report reads in RUN_DIR (checkpoint-N folders and samples/step-N.png that are
links are passed over, see `numbered`)."""


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
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why it was ignored

    def prompts(self) -> list[str]:
        validation = (self.config or {}).get("validation")
        prompts = validation.get("prompts") if isinstance(validation, dict) else None
        return [str(p) for p in prompts] if isinstance(prompts, list) else []


def number(value: object) -> float | None:
    """A metric as a float: numbers, and the "nan"/"inf" strings metrics.jsonl writes."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer beyond a float (JSON has no limit)
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def refuse_links(run_dir: Path, names: tuple[str, ...]) -> None:
    """A UserError naming the first of `names` (relative to RUN_DIR) that is a symbolic
    link: the report reads and writes the run's own files only, never through a link."""
    for name in names:
        if (run_dir / name).is_symlink():
            raise UserError(
                f"RUN_DIR {run_dir}: {name} is a symbolic link; `difftrain report` "
                "reads and writes only the run's own files, never through a link: replace it "
                "with the file or folder itself, or remove it"
            )


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"RUN_DIR {run_dir}: folder not found; pass a training output folder")
    if not run_dir.is_dir():
        raise UserError(f"RUN_DIR {run_dir}: not a folder; pass a training output folder")
    refuse_links(run_dir, INPUT_NAMES)
    if not records_a_run(run_dir):
        hint = (
            "; it looks like a test-run folder: use `difftrain report --ci-dir` for the checklist"
            if (run_dir / "junit").is_dir() or (run_dir / "logs").is_dir()
            else ""
        )
        raise UserError(
            f"RUN_DIR {run_dir}: not a difftrain run folder (no {RUN_MARKER}, which training "
            f"writes into its output folder); pass the --output-dir of a training run{hint}"
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
    by_step, ignored = step_records(text)
    if ignored and not by_step:
        raise UserError(
            f'{path}: no line is a JSON object with a "step" ({ignored} unreadable lines); '
            "restore the run's metrics.jsonl or move it aside"
        )
    rows = [by_step[step] for step in sorted(by_step)]
    return Metrics(rows=rows, ignored_lines=ignored, present=True)


def manifest_shape(data: dict) -> str | None:
    """What makes `data` no data_manifest.json (data.manifest writes it), or None."""
    if not isinstance(data.get("files"), list):
        return 'not a data manifest (no "files" list)'
    sources = data.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        return 'not a data manifest ("sources" is not a list of objects)'
    return None


def buckets_shape(data: dict) -> str | None:
    """What makes `data` no buckets.json (Buckets.table writes it), or None."""
    counts = data.get("buckets")
    if not isinstance(counts, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in counts.values()
    ):
        return 'not a bucket table ("buckets" is not an object of image counts)'
    unused = data.get("unused", [])
    if not isinstance(unused, list) or not all(isinstance(name, str) for name in unused):
        return 'not a bucket table ("unused" is not a list of bucket names)'
    return None


def read_object(
    path: Path, problems: dict[str, str], shape: Callable[[dict], str | None] | None = None
) -> dict | None:
    """A JSON object file; None (and why in `problems`) when absent, unreadable, not an
    object, or not of the `shape` the page reads."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems[path.name] = f"unreadable ({type(exc).__name__}); ignored"
        return None
    wrong = "not a JSON object" if not isinstance(data, dict) else shape and shape(data)
    if wrong:
        problems[path.name] = f"{wrong}; ignored"
        return None
    return data


def read_config(run_dir: Path, problems: dict[str, str]) -> tuple[str | None, dict | None]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems["config.yaml"] = f"unreadable ({type(exc).__name__}); ignored"
        return None, None
    import yaml

    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        problems["config.yaml"] = "not valid YAML (shown as it is)"
        return text, None
    if not isinstance(data, dict):
        problems["config.yaml"] = "not a mapping of settings (shown as it is)"
        return text, None
    return text, data


def read_skipped(path: Path, problems: dict[str, str]) -> list[tuple[str, str]] | None:
    """skipped_images.txt: `path<TAB>reason` per line."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        problems["skipped_images.txt"] = f"unreadable ({exc.strerror}); ignored"
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
    problems: dict[str, str] = {}
    config_text, config = read_config(run_dir, problems)
    env = read_object(run_dir / "env.json", problems)
    manifest = read_object(run_dir / "data_manifest.json", problems, manifest_shape)
    buckets = read_object(run_dir / "buckets.json", problems, buckets_shape)
    timings = read_object(run_dir / "timings.json", problems)
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
