"""Render the blocks that scan run output: `warnings` in the logs and `nans` in the losses."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

from difftrain.report.evidence import ANSI, Evidence, read_text, run_files
from difftrain.report.markdown import MAX_LISTED, NOT_FOUND, plural, table, trim

# "path.py:12: UserWarning: message" and "torch.jit.TracerWarning: message"
WARNING_LINE = re.compile(
    r"(?:^|[\s:'\"(])(?P<category>(?:[A-Za-z_]\w*\.)*[A-Z]\w*Warning): (?P<message>\S.*)$"
)


# --- block: warnings ------------------------------------------------------------------------


def warning_key(line: str) -> tuple[str, str] | None:
    match = WARNING_LINE.search(ANSI.sub("", line).rstrip())
    return (match["category"], trim(match["message"])) if match else None


def scan_warnings(ev: Evidence) -> tuple[Counter, list[str]]:
    """Warning counts over the logs; a log identical to one already read is not counted twice
    (the GPU smoke tees the same output to gpu_smoke.log and text2image_smoke.log)."""
    counts: Counter = Counter()
    notes, seen = [], {}
    for path in ev.logs:
        text = read_text(path)
        if text is None:
            notes.append(f"`{path.name}`: unreadable")
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            notes.append(f"`{path.name}`: same content as `{seen[digest]}`, not counted again")
            continue
        seen[digest] = path.name
        found = [key for line in text.splitlines() if (key := warning_key(line))]
        counts.update(found)
        notes.append(f"`{path.name}`: {len(found)}")
    return counts, notes


def render_warnings(ev: Evidence) -> str:
    if not ev.logs:
        return f"- Warning lines in logs: {NOT_FOUND} (no `{ev.rel(ev.ci_dir / 'logs')}/*.log`)"
    counts, notes = scan_warnings(ev)
    lines = [
        f"- Warning lines in logs: **{sum(counts.values())}** ({'; '.join(notes)})",
        f"- Distinct warnings: **{len(counts)}**",
    ]
    if counts:
        top = counts.most_common(MAX_LISTED)
        rows = [(n, category, message) for (category, message), n in top]
        lines += ["", table(("Count", "Category", "Message"), rows)]
        if len(counts) > MAX_LISTED:
            lines.append(f"\n... and {len(counts) - MAX_LISTED} more distinct warnings.")
    return "\n".join(lines)


# --- block: NaNs ----------------------------------------------------------------------------


def parse_losses(value: str) -> list[object]:
    """A `losses` property: JSON (NaN allowed), else a Python-style "[nan, 0.5]" list."""
    try:
        data = json.loads(value)
    except ValueError:
        return [token.strip() for token in value.strip().strip("[]").split(",") if token.strip()]
    return data if isinstance(data, list) else [data]


def is_non_finite(value: object) -> bool:
    # The trainer writes NaN/inf to metrics.jsonl as the strings "nan", "inf", "-inf".
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, int | float) and not math.isfinite(value)


def non_finite(values: list[object]) -> list[object]:
    return [v for v in values if is_non_finite(v)]


@dataclass
class NanScan:
    places: list[str] = field(default_factory=list)
    losses: int = 0
    tests: int = 0
    rows: int = 0
    files: int = 0
    bad_lines: int = 0


def scan_junit_losses(ev: Evidence, scan: NanScan) -> None:
    for section in ev.sections:
        for case in section.cases:
            for name, value in case.properties:
                if name != "losses":
                    continue
                losses = parse_losses(value)
                scan.tests, scan.losses = scan.tests + 1, scan.losses + len(losses)
                if non_finite(losses):
                    where = ev.rel(section.path) if section.path else section.name
                    scan.places.append(f"`{where}` `{case.name}`: losses `{trim(value, 200)}`")


def scan_metrics(ev: Evidence, scan: NanScan) -> None:
    for path in run_files(ev.ci_dir, ev.ci_dir, "metrics.jsonl"):
        scan.files += 1
        for number, line in enumerate((read_text(path) or "").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                scan.bad_lines += 1
                continue
            if not isinstance(row, dict):
                scan.bad_lines += 1
                continue
            scan.rows += 1
            bad = {k: v for k, v in row.items() if "loss" in k and is_non_finite(v)}
            if bad:
                found = ", ".join(f"{k}={v}" for k, v in bad.items())
                scan.places.append(f"`{ev.rel(path)}` line {number}: {found}")


def render_nans(ev: Evidence) -> str:
    scan = NanScan()
    scan_junit_losses(ev, scan)
    scan_metrics(ev, scan)
    checked = (
        f"{plural(scan.losses, 'loss value')} recorded by {plural(scan.tests, 'test')} and "
        f"{plural(scan.rows, 'row')} in {plural(scan.files, 'metrics.jsonl file')}"
    )
    if scan.places:
        where = plural(len(scan.places), "place")
        lines = [f"- Non-finite loss: **YES** — NaN/inf detected in {where}:"]
        lines += [f"  - {place}" for place in scan.places[:MAX_LISTED]]
        if len(scan.places) > MAX_LISTED:
            lines.append(f"  - ... and {len(scan.places) - MAX_LISTED} more")
    elif scan.tests or scan.rows:
        lines = [f"- Non-finite loss: no (checked {checked})"]
    else:
        lines = [f"- Non-finite loss: {NOT_FOUND} (no `losses` property and no metrics.jsonl)"]
    if scan.bad_lines:
        lines.append(f"- metrics.jsonl lines that are not JSON: {scan.bad_lines}")
    return "\n".join(lines)
