"""Read the runs' JUnit XML files (`junit/*.xml`) into sections of test cases."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from difftrain.report.markdown import plural

# Sections a complete smoke run has; the others (integration, matrix-...) appear when present.
EXPECTED_SECTIONS = ("unit", "gpu_smoke")
DEBUG_SECTION = "integration"  # `nox -s integration` runs the runbook's debug-path scripts


@dataclass
class Case:
    """One JUnit <testcase>: status is PASS, FAIL or SKIP; kind tells failure from error."""

    name: str
    status: str
    kind: str = ""
    reason: str = ""
    time: float = 0.0
    properties: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Section:
    """One JUnit XML file (`junit/unit.xml` -> section "unit")."""

    name: str
    path: Path | None = None
    cases: list[Case] = field(default_factory=list)
    time: float = 0.0
    timestamp: str = ""
    hostname: str = ""
    suite_problems: int = 0  # failures + errors the <testsuite> counts (collection errors)
    suite_properties: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""  # why the XML could not be read

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(c.status == status and (kind is None or c.kind == kind) for c in self.cases)

    @property
    def status(self) -> str:
        if self.path is None:
            return "NOT RUN"
        if self.error or self.count("FAIL") or self.suite_problems:
            return "FAIL"
        if not self.cases:
            return "NOT RUN"
        return "SKIP" if self.count("SKIP") == len(self.cases) else "PASS"

    def counts(self) -> str:
        return (
            f"{plural(len(self.cases), 'test')}: {self.count('PASS')} passed, "
            f"{self.count('FAIL', 'failure')} failed, {self.count('FAIL', 'error')} errors, "
            f"{self.count('SKIP')} skipped"
        )


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def read_case(element: ET.Element) -> Case:
    classname, name = element.get("classname", ""), element.get("name", "?")
    case = Case(name=f"{classname}::{name}" if classname else name, status="PASS")
    case.time = to_float(element.get("time"))
    case.properties = [
        (p.get("name", ""), p.get("value", "")) for p in element.findall("properties/property")
    ]
    for tag in ("failure", "error"):
        if (child := element.find(tag)) is not None:
            reason = first_line(child.get("message")) or first_line(child.text)
            case.status, case.kind = "FAIL", tag
            case.reason = f"error: {reason}" if tag == "error" else reason
            return case
    if (child := element.find("skipped")) is not None:
        reason = first_line(child.get("message")) or first_line(child.text)
        case.status = "SKIP"
        case.reason = f"xfail: {reason}" if child.get("type") == "pytest.xfail" else reason
    return case


def to_float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def read_junit(path: Path) -> Section:
    """One section per JUnit file; an unreadable file is a FAIL that says why."""
    section = Section(name=path.stem, path=path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        # A truncated XML usually means pytest was killed: that run did not pass.
        section.error = f"JUnit XML unreadable ({exc})"
        return section
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        section.cases += [read_case(element) for element in suite.iter("testcase")]
        section.time += to_float(suite.get("time"))
        section.timestamp = section.timestamp or suite.get("timestamp", "")
        section.hostname = section.hostname or suite.get("hostname", "")
        section.suite_problems += int(to_float(suite.get("failures"))) + int(
            to_float(suite.get("errors"))
        )
        section.suite_properties += [
            (p.get("name", ""), p.get("value", "")) for p in suite.findall("properties/property")
        ]
    return section


def read_sections(ci_dir: Path) -> list[Section]:
    found = {path.stem: read_junit(path) for path in sorted((ci_dir / "junit").glob("*.xml"))}
    for name in EXPECTED_SECTIONS:
        found.setdefault(name, Section(name=name))  # path None: NOT RUN
    order = [*EXPECTED_SECTIONS, *sorted(n for n in found if n not in EXPECTED_SECTIONS)]
    return [found[name] for name in order]
