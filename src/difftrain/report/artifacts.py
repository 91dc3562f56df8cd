"""Render the `artifacts` block: the training outputs the tests recorded or left, with sha256.

Sizes and hashes recorded in JUnit `artifact:NAME` properties are checked against the files
when the output folder is found here; the smoke and CI-parity logs are listed after them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from difftrain.io import sha256_file
from difftrain.report.evidence import SMOKE_LOG, Evidence, read_text, run_files, walk_files
from difftrain.report.junit import Case, Section
from difftrain.report.markdown import MAX_LISTED, NOT_FOUND, human_size, table, trim

SMOKE_TEST_PREFIX = "test_smoke"  # tests/gpu/test_gpu_smoke.py names its tests test_smoke_*
OUTPUT_ARTIFACTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "model_index.json",
    "config.yaml",
    "env.json",
    "metrics.jsonl",
)
ARTIFACT_VALUE = re.compile(r"^\s*(?P<size>\d+) bytes sha256=(?P<sha>[0-9a-fA-F]{64})\s*$")


@dataclass
class Recorded:
    """An `artifact:NAME` property: "<N> bytes sha256=<hex>" (raw kept if it does not parse)."""

    raw: str
    size: int | None = None
    sha256: str | None = None


def recorded_artifacts(case: Case) -> dict[str, list[Recorded]]:
    # A test may record the same name twice (two runs); keep every value, in order.
    found: dict[str, list[Recorded]] = {}
    for name, value in case.properties:
        if name.startswith("artifact:"):
            match = ARTIFACT_VALUE.match(value)
            record = Recorded(value, int(match["size"]), match["sha"].lower()) if match else None
            found.setdefault(name.removeprefix("artifact:"), []).append(record or Recorded(value))
    return found


def output_dir_of(case: Case) -> str | None:
    return next((value for name, value in case.properties if name == "output_dir"), None)


def locate_output_dir(recorded: str, ci_dir: Path) -> Path | None:
    """The recorded folder here: first re-rooted under this ci-dir (a `_ci_tmp` copied from the
    test machine keeps `pytest_tmp/...` but not the absolute path), then as recorded."""
    pure = PureWindowsPath(recorded) if "\\" in recorded else PurePosixPath(recorded)
    parts = pure.parts
    candidates = []
    if "pytest_tmp" in parts:
        after = parts[len(parts) - parts[::-1].index("pytest_tmp") :]
        candidates.append(ci_dir.joinpath("pytest_tmp", *after))
    path = Path(recorded)
    candidates += [path] if path.is_absolute() else [ci_dir.parent / path, Path.cwd() / path]
    return next((c for c in candidates if c.is_dir()), None)


def scanned_rows(folder: Path, recorded: dict[str, list[Recorded]]) -> list[tuple]:
    rows = []
    for name in dict.fromkeys([*OUTPUT_ARTIFACTS, *recorded]):
        values = recorded.get(name, [])
        path = folder / name
        try:
            size, digest = path.stat().st_size, sha256_file(path) if path.is_file() else None
        except OSError:
            size, digest = None, None
        unmatched = [v for v in values if digest is None or (v.size, v.sha256) != (size, digest)]
        if digest is not None:
            if not values:
                source = "scanned (not recorded by the test)"
            elif len(unmatched) < len(values):
                source = "scanned; matches the recorded value"
            else:
                source = "scanned; DIFFERS from the recorded value"
            rows.append((name, "yes", size, digest, source))
        elif not values:
            rows.append((name, NOT_FOUND, "-", "-", "missing from the folder, not recorded"))
        if digest is None:
            where = "missing from the folder"
        elif len(unmatched) < len(values):
            where = "another run"  # e.g. the determinism test records both of its runs
        else:
            where = "differs from the file here"
        rows += [recorded_row(name, v, f"recorded by the test ({where})") for v in unmatched]
    return rows


def recorded_row(name: str, value: Recorded, source: str) -> tuple:
    if value.sha256 is None:
        return (name, "recorded", "?", "?", f"{source}: `{trim(value.raw, 120)}`")
    return (name, "yes (recorded)", value.size, value.sha256, source)


def recorded_only_rows(recorded: dict[str, list[Recorded]]) -> list[tuple]:
    rows = []
    for name in dict.fromkeys([*OUTPUT_ARTIFACTS, *recorded]):
        values = recorded.get(name, [])
        rows += [recorded_row(name, value, "recorded by the test") for value in values]
        if not values:
            rows.append((name, NOT_FOUND, "-", "-", "not recorded by the test"))
    return rows


ARTIFACT_HEADER = ("Artifact", "Present", "Size (bytes)", "sha256", "Source")


def case_artifacts(ev: Evidence, section: Section, case: Case) -> list[str]:
    recorded = recorded_artifacts(case)
    output_dir = output_dir_of(case)
    folder = locate_output_dir(output_dir, ev.ci_dir) if output_dir else None
    lines = [f"#### {section.name}: `{case.name}` ({case.status})", ""]
    if folder is not None:
        lines.append(f"output_dir `{output_dir}`: found at `{ev.rel(folder)}`; files scanned.")
        rows = scanned_rows(folder, recorded)
    else:
        why = f"output_dir `{output_dir}` {NOT_FOUND} here" if output_dir else "no output_dir"
        lines.append(f"{why}: sizes and sha256 below are as recorded by the test.")
        rows = recorded_only_rows(recorded)
    return [*lines, "", table(ARTIFACT_HEADER, rows), ""]


def smoke_folders(ci_dir: Path) -> list[Path]:
    """Training output folders of the GPU smoke tests under pytest_tmp.

    pytest names a test's tmp_path after the test, and the smoke tests are `test_smoke_*`;
    the unit tests' many training folders would bury them otherwise.
    """
    weights = PurePosixPath(OUTPUT_ARTIFACTS[0])
    tmp = ci_dir / "pytest_tmp"
    return [
        path.parent.parent
        for path in run_files(ci_dir, tmp, weights.name)
        if path.parent.name == weights.parent.name
        and any(part.startswith(SMOKE_TEST_PREFIX) for part in path.relative_to(tmp).parts)
    ]


def fallback_artifacts(ev: Evidence) -> list[str]:
    # The runbook's CI-parity command writes no JUnit XML: look for its output folders instead.
    folders = smoke_folders(ev.ci_dir)
    where = f"`{ev.rel(ev.ci_dir / 'pytest_tmp')}/**/{SMOKE_TEST_PREFIX}*`"
    if not folders:
        return [f"No test recorded artifacts and no smoke training output in {where}: {NOT_FOUND}."]
    lines = [f"No test recorded artifacts; smoke training output found in {where}:", ""]
    for folder in folders[:MAX_LISTED]:
        lines += [
            f"#### `{ev.rel(folder)}`",
            "",
            table(ARTIFACT_HEADER, scanned_rows(folder, {})),
            "",
        ]
    if len(folders) > MAX_LISTED:
        lines.append(f"... and {len(folders) - MAX_LISTED} more folders.")
    return lines


def log_presence(ev: Evidence) -> list[str]:
    log, tmp = ev.ci_dir / "logs" / SMOKE_LOG, ev.ci_dir / "pytest_tmp"
    text = read_text(log)
    if text is None:
        log_line = f"- [ ] `{ev.rel(log)}`: {NOT_FOUND}"
    else:
        size = f"{log.stat().st_size} bytes, {len(text.splitlines())} lines"
        log_line = f"- [x] `{ev.rel(log)}`: present ({size})"
    if tmp.is_dir():
        files = sum(1 for _ in walk_files(tmp))
        tops = ", ".join(sorted(p.name for p in tmp.iterdir() if p.is_dir())) or "none"
        tmp_line = f"- [x] `{ev.rel(tmp)}`: present ({files} files; folders: {tops})"
    else:
        tmp_line = f"- [ ] `{ev.rel(tmp)}`: {NOT_FOUND}"
    others = [
        f"`{ev.rel(p)}` ({human_size(p.stat().st_size)})" for p in ev.logs if p.name != SMOKE_LOG
    ]
    other_line = f"- Other logs: {', '.join(others) if others else NOT_FOUND}"
    return [log_line, tmp_line, other_line]


def render_artifacts(ev: Evidence) -> str:
    lines = []
    for section in ev.sections:
        for case in section.cases:
            if recorded_artifacts(case) or output_dir_of(case):
                lines += case_artifacts(ev, section, case)
    if not lines:
        lines = [*fallback_artifacts(ev), ""]
    return "\n".join([*lines, "Logs:", "", *log_presence(ev)])
