"""Render the test-result blocks: `summary`, `tests`, `durations` and `failures`."""

from __future__ import annotations

import re

from difftrain.report.evidence import ANSI, SMOKE_LOG, Evidence, read_text
from difftrain.report.junit import DEBUG_SECTION, EXPECTED_SECTIONS, Case, Section
from difftrain.report.machine import env_packages
from difftrain.report.markdown import NOT_FOUND, table, trim
from difftrain.report.scans import non_finite, parse_losses

PYTEST_SUMMARY = re.compile(
    r"^=*\s*(?P<body>(?:\d+ \w+|no tests ran)(?:, \d+ \w+)*) in [\d.]+s(?: \([^)]*\))?\s*=*$"
)


# --- block: summary, tests, durations -------------------------------------------------------


def section_row(ev: Evidence, name: str, optional_note: str = "") -> tuple[str, str]:
    section = ev.section(name)
    if section is None or section.path is None:
        note = optional_note or f"no `{ev.rel(ev.ci_dir / 'junit' / (name + '.xml'))}`"
        return "NOT RUN", note
    if section.error:
        return "FAIL", f"{section.error}; `{ev.rel(section.path)}`"
    return section.status, f"{section.counts()}; `{ev.rel(section.path)}`"


def install_row(ev: Evidence) -> tuple[str, str]:
    packages = env_packages(ev)
    if packages.get("difftrain"):
        found = ", ".join(
            f"{name} {packages.get(name) or NOT_FOUND}"
            for name in ("difftrain", "torch", "diffusers")
        )
        return "PASS (inferred)", f"env.json records {found}; confirm with the pip output"
    if any(s.count("PASS") for s in ev.sections):
        return "PASS (inferred)", "tests passed against the installed package"
    return NOT_FOUND, "no env.json and no passing test: fill by hand"


def pytest_summary(text: str | None) -> str | None:
    """The last `N passed, M failed in 1.2s` line of a pytest log, or None."""
    summary = None
    for line in (text or "").splitlines():
        if match := PYTEST_SUMMARY.match(ANSI.sub("", line).strip()):
            summary = match.group("body")
    return summary


def summary_status(summary: str) -> str:
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    if counts.get("failed") or counts.get("error"):
        return "FAIL"
    if counts.get("passed") or counts.get("xpassed"):
        return "PASS"
    return "SKIP" if counts.get("skipped") or counts.get("xfailed") else "NOT RUN"


def ci_parity_row(ev: Evidence) -> tuple[str, str]:
    log = ev.ci_dir / "logs" / SMOKE_LOG
    tmp = ev.ci_dir / "pytest_tmp"
    tmp_note = f"`{ev.rel(tmp)}` {'present' if tmp.is_dir() else NOT_FOUND}"
    text = read_text(log)
    if text is None:
        return "NOT RUN", f"`{ev.rel(log)}` {NOT_FOUND}; {tmp_note}"
    summary = pytest_summary(text)
    if summary is None:
        return "UNKNOWN", f"`{ev.rel(log)}` has no pytest summary line (interrupted?); {tmp_note}"
    return summary_status(summary), f"pytest: {summary}; `{ev.rel(log)}`; {tmp_note}"


def render_summary(ev: Evidence) -> str:
    rows = [
        ("1. Install", *install_row(ev)),
        ("2. Unit tests", *section_row(ev, "unit")),
        ("3. GPU smoke via pytest", *section_row(ev, "gpu_smoke")),
        ("4. CI-parity run", *ci_parity_row(ev)),
        (
            "5. Debug path scripts (if used)",
            *section_row(ev, DEBUG_SECTION, "optional: only needed when the GPU smoke fails"),
        ),
    ]
    known = {*EXPECTED_SECTIONS, DEBUG_SECTION}
    rows += [
        (f"Other: {s.name}", *section_row(ev, s.name)) for s in ev.sections if s.name not in known
    ]
    return table(("Section", "Result", "Notes"), rows)


def property_lines(case: Case) -> list[str]:
    lines = []
    for name, value in case.properties:
        if name.startswith("artifact:"):
            continue  # listed under Artifacts, with size and sha256
        flag = " **(non-finite!)**" if name == "losses" and non_finite(parse_losses(value)) else ""
        lines.append(f"  - {name}: `{trim(value, 300)}`{flag}")
    return lines


def case_lines(case: Case) -> list[str]:
    reason = f" — {trim(case.reason)}" if case.reason else ""
    return [f"- {case.status} `{case.name}` ({case.time:.2f} s){reason}", *property_lines(case)]


def section_block(ev: Evidence, section: Section) -> list[str]:
    heading = f"#### {section.name}: {section.status}"
    if section.path is None:
        return [heading, "", f"No `{ev.rel(ev.ci_dir / 'junit' / (section.name + '.xml'))}`.", ""]
    lines = [heading, "", f"`{ev.rel(section.path)}`: {section.error or section.counts()}."]
    if section.suite_properties:
        lines += ["", "Suite properties:"]
        lines += [f"- {name}: `{trim(value, 300)}`" for name, value in section.suite_properties]
    lines.append("")
    for case in section.cases:
        lines += case_lines(case)
    return [*lines, ""] if section.cases else lines


def render_tests(ev: Evidence) -> str:
    lines = []
    for section in ev.sections:
        lines += section_block(ev, section)
    return "\n".join(lines)


def render_durations(ev: Evidence) -> str:
    rows = []
    for s in ev.sections:
        if s.path is None or s.error:
            rows.append((s.name, "-", "-", "-", "-", s.error or "NOT RUN"))
            continue
        slowest = max(s.cases, key=lambda c: c.time, default=None)
        slow = f"{slowest.name} ({slowest.time:.2f} s)" if slowest else "-"
        host = f"{s.timestamp or '?'} on {s.hostname or '?'}"
        rows.append(
            (
                s.name,
                len(s.cases),
                f"{s.time:.2f}",
                f"{sum(c.time for c in s.cases):.2f}",
                slow,
                host,
            )
        )
    header = (
        "Section",
        "Tests",
        "Total time (s)",
        "Sum of test times (s)",
        "Slowest test",
        "Started",
    )
    return table(header, rows)


# --- block: failures ------------------------------------------------------------------------


def full_log(ev: Evidence, section: Section) -> str:
    log = ev.ci_dir / "logs" / f"{section.name}.log"
    if log.is_file():
        return f"full log: `{ev.rel(log)}`"
    return f"traceback in `{ev.rel(section.path)}`" if section.path else "no log"


def render_failures(ev: Evidence) -> str:
    lines = []
    for section in ev.sections:
        if section.error:
            lines.append(f"- {section.name}: {section.error} (`{ev.rel(section.path)}`)")
        failed = [case for case in section.cases if case.status == "FAIL"]
        for case in failed:
            lines.append(
                f"- {section.name}: `{case.name}` — {trim(case.reason) or 'no message'} "
                f"({full_log(ev, section)})"
            )
        if section.suite_problems and not failed and not section.error:
            lines.append(
                f"- {section.name}: the XML counts {section.suite_problems} failures/errors "
                f"without a failed test case ({full_log(ev, section)})"
            )
    status, note = ci_parity_row(ev)
    if status in ("FAIL", "UNKNOWN"):
        lines.append(f"- CI-parity run: {status} — {note}")
    return "\n".join(lines) or "- none"
