"""Fill the MVP smoke checklist from what the test runs left under `_ci_tmp/`.

    difftrain report                                   # reads ./_ci_tmp
    difftrain report --ci-dir copied/_ci_tmp           # a run from another machine
    difftrain report --template my_checklist.md
    nox -s report

The template (`docs/mvp_smoke_checklist.md`) marks the parts that can be filled from files
with `<!-- auto:NAME -->` ... `<!-- /auto:NAME -->`; everything else (deviations, sign-off)
is left for a person. The filled copy goes to `<ci-dir>/reports/mvp_smoke_checklist.md`.

What is read, all under the ci-dir and all optional: `junit/*.xml` (one section per file),
`logs/*.log`, `logs/nvidia-smi.txt|csv`, the newest `env.json` and every `metrics.jsonl`,
and the training output folders the GPU smoke names in its JUnit properties. A missing
file is reported as "not found"; only a missing ci-dir or template is an error.

Only the standard library is used: the report must run where torch is not installed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

from difftrain.errors import UserError
from difftrain.io import atomic_write_text, sha256_file

TEMPLATE_NAME = "mvp_smoke_checklist.md"
SMOKE_LOG = "text2image_smoke.log"
SMOKE_TEST_PREFIX = "test_smoke"  # tests/gpu/test_gpu_smoke.py names its tests test_smoke_*
NESTED_CI_NAME = "_ci_tmp"  # a ci-dir inside the ci-dir is test data, not a run (see run_files)
# Sections a complete smoke run has; the others (integration, matrix-...) appear when present.
EXPECTED_SECTIONS = ("unit", "gpu_smoke")
DEBUG_SECTION = "integration"  # `nox -s integration` runs the runbook's debug-path scripts
OUTPUT_ARTIFACTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "model_index.json",
    "config.yaml",
    "env.json",
    "metrics.jsonl",
)
SMI_KEYS = ("name", "driver_version", "memory.total", "compute_cap")  # noxfile's CSV query
NOT_FOUND = "not found"
MAX_LISTED = 50  # distinct warnings / NaN places / smoke folders listed before "... more"

MARKER = re.compile(
    r"<!-- auto:(?P<name>[\w-]+) -->\n?(?P<body>.*?)<!-- /auto:(?P=name) -->", re.DOTALL
)
# "path.py:12: UserWarning: message" and "torch.jit.TracerWarning: message"
WARNING_LINE = re.compile(
    r"(?:^|[\s:'\"(])(?P<category>(?:[A-Za-z_]\w*\.)*[A-Z]\w*Warning): (?P<message>\S.*)$"
)
ARTIFACT_VALUE = re.compile(r"^\s*(?P<size>\d+) bytes sha256=(?P<sha>[0-9a-fA-F]{64})\s*$")
PYTEST_SUMMARY = re.compile(
    r"^=*\s*(?P<body>(?:\d+ \w+|no tests ran)(?:, \d+ \w+)*) in [\d.]+s(?: \([^)]*\))?\s*=*$"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- what the runs left behind --------------------------------------------------------------


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


# --- markdown helpers -----------------------------------------------------------------------


def cell(value: object) -> str:
    """A value safe inside a markdown table cell."""
    text = " ".join(str(value).split())
    return text.replace("|", "\\|") or " "


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def trim(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_block(text: str) -> str:
    # A fence longer than any backtick run inside, so a captured log cannot end it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def human_size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


# --- block: source and environment ----------------------------------------------------------


def render_source(ev: Evidence) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Filled by `difftrain report` from `{ev.ci_dir}` on {now}. The parts between "
        "`auto` markers come from the files found there: check them, then fill the "
        "deviations and the sign-off by hand."
    )


def env_dicts(ev: Evidence, key: str) -> list[dict]:
    """env.json's list of objects under `key` (gpus, nvidia_smi); [] for anything else."""
    value = (ev.env or {}).get(key)
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def env_packages(ev: Evidence) -> dict:
    packages = (ev.env or {}).get("packages")
    return packages if isinstance(packages, dict) else {}


def gpu_names(ev: Evidence) -> str | None:
    names = [str(g["name"]) for g in env_dicts(ev, "gpus") if g.get("name")]
    names = names or [row["name"] for row in smi_rows(ev) if row.get("name")]
    return ", ".join(names) or None


def smi_rows(ev: Evidence) -> list[dict[str, str]]:
    """nvidia-smi facts: the captured CSV, else the query env.json recorded."""
    return ev.smi_rows or env_dicts(ev, "nvidia_smi")


def smi_value(ev: Evidence, key: str) -> str | None:
    values = [row[key] for row in smi_rows(ev) if row.get(key)]
    return ", ".join(dict.fromkeys(values)) or None


def driver_cuda(ev: Evidence) -> str | None:
    match = re.search(r"CUDA Version:\s*([\d.]+)", ev.smi_text or "")
    return match.group(1) if match else None


def environment_rows(ev: Evidence) -> list[tuple[str, str]]:
    env = ev.env or {}
    packages = env_packages(ev)
    gpus = env_dicts(ev, "gpus")
    torch_cuda = env.get("cuda") or ("none (CPU build)" if env else None)
    cuda = f"{torch_cuda or NOT_FOUND} / driver supports {driver_cuda(ev) or NOT_FOUND}"
    memory = smi_value(ev, "memory.total") or (gpus and f"{gpus[0].get('memory_gib')} GiB")
    libraries = ", ".join(
        f"{name} {packages.get(name) or NOT_FOUND}"
        for name in ("diffusers", "transformers", "accelerate")
    )
    rows = [
        ("GPU model", gpu_names(ev)),
        ("GPU memory", memory),
        (
            "Compute capability",
            smi_value(ev, "compute_cap") or (gpus and gpus[0].get("capability")),
        ),
        ("NVIDIA driver", smi_value(ev, "driver_version")),
        ("CUDA (torch build / driver supports)", cuda),
        ("Python", env.get("python")),
        ("PyTorch", env.get("torch")),
        ("cuDNN", env.get("cudnn")),
        ("difftrain version", packages.get("difftrain")),
        ("difftrain commit", env.get("git_commit")),
        ("diffusers / transformers / accelerate", libraries if packages else None),
        ("Platform", env.get("platform")),
    ]
    return [
        (name, str(value) if value not in (None, "", []) else NOT_FOUND) for name, value in rows
    ]


def environment_sources(ev: Evidence) -> list[str]:
    lines = []
    if ev.env_path is None:
        lines.append(f"- env.json: {NOT_FOUND} under `{ev.ci_dir.name}`")
    else:
        kind = "a GPU run" if env_dicts(ev, "gpus") else "a CPU run (no env.json saw a GPU)"
        lines.append(
            f"- env.json: `{ev.rel(ev.env_path)}` (newest of {ev.env_files} found; from {kind})"
        )
    csv_path = ev.ci_dir / "logs" / "nvidia-smi.csv"
    lines.append(
        f"- nvidia-smi CSV: `{ev.rel(csv_path)}`"
        if ev.smi_rows
        else f"- nvidia-smi CSV: {NOT_FOUND}"
    )
    return lines


def render_environment(ev: Evidence) -> str:
    return "\n".join([table(("Item", "Value"), environment_rows(ev)), "", *environment_sources(ev)])


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


# --- block: artifacts -----------------------------------------------------------------------


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


# --- blocks: failures, nvidia-smi -----------------------------------------------------------


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


def render_nvidia_smi(ev: Evidence) -> str:
    path = ev.ci_dir / "logs" / "nvidia-smi.txt"
    if not (ev.smi_text or "").strip():
        return f"Not captured: `{ev.rel(path)}` {NOT_FOUND} (`nox -s gpu_smoke` writes it)."
    return f"From `{ev.rel(path)}`:\n\n{code_block(ev.smi_text)}"


# --- filling the template -------------------------------------------------------------------


BLOCKS: dict[str, Callable[[Evidence], str]] = {
    "source": render_source,
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


def check_ci_dir(ci_dir: Path) -> None:
    fix = (
        "run the test sessions first (e.g. `nox -s gpu_smoke`) or pass --ci-dir with the "
        "_ci_tmp folder copied from the test machine"
    )
    if not ci_dir.exists():
        raise UserError(f"--ci-dir {ci_dir}: folder not found; {fix}")
    if not ci_dir.is_dir():
        raise UserError(f"--ci-dir {ci_dir}: not a folder; {fix}")
    try:
        next(ci_dir.iterdir(), None)
    except OSError as exc:
        raise UserError(
            f"--ci-dir {ci_dir}: cannot be read ({exc.strerror}); fix its permissions"
        ) from exc


def write_report(ci_dir: Path, template: Path | None = None) -> Path:
    """Fill the checklist template from `ci_dir` into `<ci_dir>/reports/`; return that path.

    Raises UserError for a missing or unreadable ci-dir or template; anything missing inside
    the ci-dir is reported in the checklist as "not found".
    """
    ci_dir = Path(ci_dir)
    check_ci_dir(ci_dir)
    template_path = find_template(template)
    text = read_text(template_path)
    if text is None:
        raise UserError(f"template {template_path}: cannot be read; fix its permissions")
    filled, count = fill_template(text, collect(ci_dir))
    if count == 0:
        raise UserError(
            f"template {template_path} has no <!-- auto:NAME --> markers to fill; "
            f"use docs/{TEMPLATE_NAME} or add markers ({', '.join(BLOCKS)})"
        )
    output = ci_dir / "reports" / TEMPLATE_NAME
    try:
        atomic_write_text(output, filled)
    except OSError as exc:
        raise UserError(f"cannot write {output} ({exc.strerror}); check the folder") from exc
    return output
