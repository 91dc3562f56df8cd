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
file is reported as "not found"; only a missing ci-dir or template is an error. Without an
env.json (the runbook's plain pytest path), the environment, commit and nvidia-smi come from
the machine running the report (`local_machine`), and the checklist says so.

Only the standard library is used: the report must run where torch is not installed.

The modules, by job: `junit` reads the JUnit XML, `evidence` gathers the rest of the ci-dir,
`local_machine` describes this machine, `markdown` holds the table and text helpers,
`machine`, `results`, `artifacts` and `scans` render the auto blocks, and `template` finds
the checklist and fills its markers.

`difftrain report RUN_DIR` is the other report, of one training run, as HTML (matplotlib
for its plots, still no torch): `run_report` (the command), `run_facts` (reading the run
folder), `plots`, `html_page` and `card_section` (the model card's link to it).
"""

from __future__ import annotations

from pathlib import Path

from difftrain.errors import UserError
from difftrain.io import atomic_write_text
from difftrain.report.artifacts import OUTPUT_ARTIFACTS
from difftrain.report.evidence import Evidence, collect, read_text
from difftrain.report.junit import Case, Section, read_junit
from difftrain.report.template import BLOCKS, MARKER, TEMPLATE_NAME, fill_template, find_template

__all__ = [
    "BLOCKS",
    "MARKER",
    "OUTPUT_ARTIFACTS",
    "TEMPLATE_NAME",
    "Case",
    "Evidence",
    "Section",
    "collect",
    "fill_template",
    "find_template",
    "read_junit",
    "write_report",
]


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
