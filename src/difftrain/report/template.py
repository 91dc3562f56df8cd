"""Find the checklist template and fill its `<!-- auto:NAME -->` blocks from the evidence.

The `source` block (who filled the checklist, from where, when) is rendered here too; the
other blocks come from the render modules listed in `BLOCKS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from difftrain.errors import UserError
from difftrain.report.artifacts import render_artifacts
from difftrain.report.evidence import SMOKE_LOG, Evidence
from difftrain.report.local_machine import FROM_MACHINE
from difftrain.report.machine import render_environment, render_nvidia_smi
from difftrain.report.markdown import NOT_FOUND
from difftrain.report.results import (
    render_durations,
    render_failures,
    render_summary,
    render_tests,
)
from difftrain.report.scans import render_nans, render_warnings

TEMPLATE_NAME = "mvp_smoke_checklist.md"
MARKER = re.compile(
    r"<!-- auto:(?P<name>[\w-]+) -->\n?(?P<body>.*?)<!-- /auto:(?P=name) -->", re.DOTALL
)


def render_source(ev: Evidence) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Filled by `difftrain report` from `{ev.ci_dir}` on {now}. The parts between "
        "`auto` markers come from the files found there: check them, then fill the "
        "deviations and the sign-off by hand."
    )


def utc(stamp: str) -> tuple[datetime, str] | None:
    """A JUnit timestamp as naive UTC, with a note when it carries no offset."""
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        return when, " (the test machine's local time: the XML gives no offset)"
    return when.astimezone(timezone.utc).replace(tzinfo=None), ""


def run_time(ev: Evidence) -> str:
    """When the tests ran: the earliest JUnit start, else when the CI-parity log was last
    written, else now (and which of these it is)."""
    stamps = [
        (*parsed, section)
        for section in ev.sections
        if section.timestamp and (parsed := utc(section.timestamp))
    ]
    if stamps:
        when, note, section = min(stamps, key=lambda item: item[0])
        where = f"`{ev.rel(section.path)}`" if section.path else section.name
        return f"{when:%Y-%m-%d %H:%M} UTC (start of the earliest JUnit suite, {where}){note}"
    log = ev.ci_dir / "logs" / SMOKE_LOG
    try:
        written = datetime.fromtimestamp(log.stat().st_mtime, timezone.utc)
    except OSError:
        now = datetime.now(timezone.utc)
        why = f"no JUnit XML or smoke log in `{ev.ci_dir.name}`"
        return f"{now:%Y-%m-%d %H:%M} UTC (now, when the report was made: {why}; {FROM_MACHINE})"
    why = f"when `{ev.rel(log)}` was last written: the end of the CI-parity run"
    return f"{written:%Y-%m-%d %H:%M} UTC ({why})"


def run_commit(ev: Evidence) -> str:
    if ev.env is not None:
        commit = ev.env.get("git_commit")
        where = f"env.json `{ev.rel(ev.env_path)}`" if ev.env_path else "env.json"
        return f"`{commit}` (from {where})" if commit else f"{NOT_FOUND} ({where} records none)"
    commit, whose = ev.machine.get("git_commit"), ev.machine.get("commit_source")
    if not commit:
        return f"{NOT_FOUND} (no env.json, and no git checkout on the machine running the report)"
    return f"`{commit}` ({whose}; {FROM_MACHINE})"


def render_run(ev: Evidence) -> str:
    return "\n".join(
        [
            f"- Run date/time (UTC): {run_time(ev)}",
            f"- Repository commit (`git rev-parse HEAD`): {run_commit(ev)}",
        ]
    )


BLOCKS: dict[str, Callable[[Evidence], str]] = {
    "source": render_source,
    "run": render_run,
    "environment": render_environment,
    "summary": render_summary,
    "tests": render_tests,
    "artifacts": render_artifacts,
    "warnings": render_warnings,
    "nans": render_nans,
    "failures": render_failures,
    "nvidia-smi": render_nvidia_smi,
    "durations": render_durations,
}


def fill_template(text: str, ev: Evidence) -> tuple[str, int]:
    """Replace the body of every known `auto:NAME` block; unknown names are left as they are."""
    filled = 0

    def replace(match: re.Match) -> str:
        nonlocal filled
        render = BLOCKS.get(match["name"])
        if render is None:
            return match.group(0)
        filled += 1
        name = match["name"]
        # The markers stay, so a filled report shows which parts were generated.
        return f"<!-- auto:{name} -->\n{render(ev).rstrip()}\n<!-- /auto:{name} -->"

    return MARKER.sub(replace, text), filled


def find_template(template: Path | None) -> Path:
    """--template, else docs/ in the current folder, else docs/ of difftrain's source checkout."""
    if template is not None:
        if not template.is_file():
            raise UserError(
                f"--template {template}: file not found; pass an existing checklist or leave "
                f"--template out to use docs/{TEMPLATE_NAME}"
            )
        return template
    import difftrain

    candidates = [
        Path.cwd() / "docs" / TEMPLATE_NAME,
        Path(difftrain.__file__).resolve().parents[2] / "docs" / TEMPLATE_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"checklist template docs/{TEMPLATE_NAME} not found (looked in {Path.cwd()} and the "
        "difftrain checkout); run from the repository root or pass --template PATH"
    )
